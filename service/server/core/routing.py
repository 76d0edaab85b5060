"""What every API family's routes share: a ``/v1`` router behind the API key, body validation that
answers 400 (not FastAPI's 422), and the OpenAPI pieces for multipart bodies and common errors."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ValidationError

from service.server.core.deps import require_api_key
from service.server.core.errors import validation_error
from service.server.core.openapi import error_responses, inline_schema

#: A generation route's answer to ``Prefer: respond-async``: the stored job (GET /v1/jobs/{id}).
JOB_ACCEPTED: dict[int | str, dict[str, Any]] = {202: {
    "description": "with `Prefer: respond-async` (RFC 7240): the request passed every check and is now a queued "
                   "job; follow it at `Location` (/v1/jobs/{id}, /v1/jobs/{id}/events). A `Webhook` header or a "
                   "`webhook` field names a URL the finished job is POSTed to (hosts of --webhook-allow-hosts)",
    "headers": {"Location": {"description": "/v1/jobs/{id}", "schema": {"type": "string"}}},
    "content": {"application/json": {"schema": {"type": "object", "description": "the job resource"}}}}}

#: What every generation route may answer besides 200 (401, 408, 413: see service.server.core.openapi).
GENERATION_ERRORS = {**JOB_ACCEPTED, **error_responses(400, 415, 429, 503, 507)}


def v1_router(**kwargs: Any) -> APIRouter:
    """A router under ``/v1`` whose every route requires the API key (when one is set)."""
    return APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], **kwargs)


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """``data`` as ``model``, or a 400 naming what is wrong (for bodies read by hand: multipart, JSON-or-form)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def multipart_openapi(model: type[BaseModel], files: str) -> dict[str, Any]:
    """The OpenAPI request body of a multipart route: ``model``'s fields plus a file array ``files``."""
    schema = inline_schema(model)
    schema["properties"][files] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {"requestBody": {"content": {"multipart/form-data": {"schema": schema}}, "required": True}}
