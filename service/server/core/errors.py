"""One error shape for every failure, OpenAI's: ``{"error": {"message", "type", "param", "code"}}``.

The official ``openai`` client reads it, and so can anyone else. Validation errors are 400 (not
FastAPI's 422) with the first problem's location in ``param``; unexpected exceptions are logged and
answered as 500 in the same shape, never as a bare traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    507: "server_error",
}


class APIError(Exception):
    """An error answered to the client: HTTP status, message, machine-readable code, offending field."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code, param)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def closing_answer(exc: APIError, extra: Sequence[tuple[bytes, bytes]] = ()) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Raw headers and body of an error answered outside FastAPI's handlers (the body guard, the
    connection guard), with ``Connection: close``: the rest of the request is left unread."""
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *((k.lower().encode(), v.encode()) for k, v in exc.headers.items()), *extra]
    return headers, body


async def send_closing_error(send: Send, exc: APIError, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """:func:`closing_answer` sent through an ASGI ``send``."""
    headers, body = closing_answer(exc, extra)
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _describe(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """First pydantic error → (message, param, code)."""
    first: Any = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": "invalid"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    kind = first.get("type", "invalid")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None, "invalid_json"
    if kind == "extra_forbidden":
        return f"unknown field {param!r}", param, "unknown_field"
    if kind == "missing":
        if param is None:
            return "a request body is required", None, "missing_field"
        return f"missing required field {param!r}", param, "missing_field"
    msg = str(first.get("msg", "invalid value"))
    return (f"{param}: {msg}" if param else msg), param, "invalid_value"


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    message, param, code = _describe(errors)
    return APIError(400, message, code, param)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, message, code, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", "internal_error"))
