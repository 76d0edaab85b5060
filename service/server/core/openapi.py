"""The OpenAPI document, made to say what the service really answers.

FastAPI writes a 422 for every route that validates input, but the service answers validation errors
with 400 (``service.server.core.errors``); it marks every route that reads bearer credentials as secured,
whether or not the service has a key; and it knows nothing of what the middleware answers (413, 408)
or adds (``X-Request-Id``). Routes declare their own errors with :func:`error_responses`; everything
that holds for every route is written once here, by :func:`truthful` over FastAPI's document:

- no 422 (and no schema of FastAPI's validation error); 400 wherever FastAPI validated input;
- with an API key, 401 (and ``WWW-Authenticate``) on every secured route; without one, no security
  requirement and no 401 anywhere;
- 408 and 413 on every route that takes a body (``service.server.app``'s body guard);
- ``X-Request-Id`` on every answer.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.schema.common import ErrorResponse

_ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}

#: What each error status means on this service (a route may say more in its own description).
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "invalid request: a field, an image or the generation it asks for (error.param names the field)",
    401: "missing or wrong API key",
    404: "not found",
    408: "the request's headers or body did not arrive in time (--header-timeout, --body-timeout)",
    413: "request body or an uploaded image over its limit",
    415: "wrong content type",
    429: "slots and queue are full: retry after Retry-After seconds",
    503: "the model is loading, the service is shutting down, or the engine died (Retry-After when known)",
    507: "`Prefer: respond-async` only: the job store is full (code store_full); new jobs are refused until "
         "space is freed",
}

#: Headers some error answers carry.
_RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {**_RETRY_AFTER, "required": True}},
    503: {"Retry-After": {**_RETRY_AFTER, "required": False}},
}

REQUEST_ID_HEADER = {
    "description": "the client's own X-Request-Id, or a new one: quote it in a bug report",
    "required": True,
    "schema": {"type": "string"},
}

#: FastAPI's validation-error schemas, unused once its 422s are gone.
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def error_response(status: int, description: str | None = None) -> dict[str, Any]:
    """One error answer for a route's ``responses=``: the error shape, and the status's headers."""
    out: dict[str, Any] = {"model": ErrorResponse, "description": description or ERROR_DESCRIPTIONS[status]}
    if status in _ERROR_HEADERS:
        out["headers"] = copy.deepcopy(_ERROR_HEADERS[status])
    return out


def error_responses(*statuses: int, descriptions: Mapping[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """Error answers for a route's ``responses=``; ``descriptions`` replaces the usual text of a status."""
    return {s: error_response(s, (descriptions or {}).get(s)) for s in statuses}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` written in place: a schema placed by hand in the document
    (a multipart body, an event's data) cannot keep pydantic's ``#/$defs/…`` references, which point
    into a document that does not hold them."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def event_stream_schema(events: Mapping[str, type[BaseModel]]) -> dict[str, Any]:
    """The ``text/event-stream`` schema of a stream whose events are ``events`` (name → model of its data).

    Before OpenAPI 3.2 (which adds ``itemSchema``) the schema of an event stream describes one event:
    an object with the event's name and its data, here JSON text whose schema is the event's model."""
    return {"oneOf": [
        {"type": "object", "required": ["event", "data"],
         "properties": {"event": {"const": name},
                        "data": {"type": "string", "contentMediaType": "application/json",
                                 "contentSchema": inline_schema(model)}}}
        for name, model in events.items()]}


def _error_answer(status: int) -> dict[str, Any]:
    """An error answer as it appears in the finished document."""
    out: dict[str, Any] = {"description": ERROR_DESCRIPTIONS[status],
                           "content": {"application/json": {"schema": dict(_ERROR_SCHEMA)}}}
    if status in _ERROR_HEADERS:
        out["headers"] = copy.deepcopy(_ERROR_HEADERS[status])
    return out


def _operations(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for item in doc.get("paths", {}).values():
        for method in _METHODS:
            if method in item:
                yield item[method]


def truthful(doc: dict[str, Any], auth: bool) -> dict[str, Any]:
    """FastAPI's document rewritten as the module docstring says (a new dict; ``doc`` is not changed).
    ``auth``: whether the service requires an API key."""
    doc = copy.deepcopy(doc)
    for op in _operations(doc):
        responses = op.setdefault("responses", {})
        if responses.pop("422", None) is not None:
            responses.setdefault("400", _error_answer(400))
        if op.get("security"):
            if auth:
                responses.setdefault("401", _error_answer(401))
            else:
                del op["security"]
        if "requestBody" in op:
            responses.setdefault("408", _error_answer(408))
            responses.setdefault("413", _error_answer(413))
        for answer in responses.values():
            answer.setdefault("headers", {})["X-Request-Id"] = dict(REQUEST_ID_HEADER)
    components = doc.get("components", {})
    schemas = components.get("schemas", {})
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    if not auth:
        components.pop("securitySchemes", None)
    return doc


def install(app: FastAPI, auth: bool) -> None:
    """Serve :func:`truthful` over FastAPI's document at the app's ``openapi_url`` (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                              summary=app.summary, description=app.description, routes=app.routes)
            app.openapi_schema = truthful(doc, auth)
        return app.openapi_schema

    app.openapi = openapi  # FastAPI's documented way to replace the document

