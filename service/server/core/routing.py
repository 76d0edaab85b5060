"""What every API family's routes share: a ``/v1`` router behind the API key, body validation that
answers 400 (not FastAPI's 422), and the OpenAPI pieces for multipart bodies and common errors."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ValidationError

from service.server.core.deps import require_api_key
from service.server.core.errors import validation_error
from service.server.core.openapi import error_responses, inline_schema

#: What every generation route may answer besides 200 (401, 408, 413: see service.server.core.openapi).
GENERATION_ERRORS = error_responses(400, 415, 429, 503)


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
