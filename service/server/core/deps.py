"""FastAPI dependencies: the runtime, bearer-token auth, content types, and multipart forms."""

from __future__ import annotations

import json
from typing import Any, Mapping

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from service.server.core.auth import Caller
from service.server.core.errors import APIError, bad_request
from service.server.core.runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="the service's API key (--api-key), when one is set")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def caller_of(credentials: HTTPAuthorizationCredentials | None, runtime: Runtime) -> Caller | None:
    """Who presents ``credentials``: a caller (anonymous when no key is set), or None for a wrong key."""
    return runtime.api_keys.identify(credentials.credentials if credentials is not None else None)


def key_matches(credentials: HTTPAuthorizationCredentials | None, runtime: Runtime) -> bool:
    """Whether the caller may see what the API keys guard: one of the keys, or no key set."""
    return caller_of(credentials, runtime) is not None


async def current_caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                         runtime: Runtime = Depends(get_runtime)) -> Caller:
    """The caller, kept on ``request.state.caller`` for what runs later (the submit of a job); 401 when
    a key is required and none of them was sent."""
    caller = caller_of(credentials, runtime)
    if caller is None:
        raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    request.state.caller = caller
    return caller


async def require_api_key(caller: Caller = Depends(current_caller)) -> None:
    """Every route but /health and /ready needs ``Authorization: Bearer <key>`` when a key is set."""


async def optional_api_key(request: Request, runtime: Runtime = Depends(get_runtime)) -> bool:
    """Whether the caller holds the key (or none is set), for routes open to all that say more to the
    key's holders. Read without a security dependency, so the API document does not mark the route as
    needing a key."""
    return key_matches(await _bearer(request), runtime)


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(request: Request) -> bool:
    ct = content_type(request)
    return ct == "application/json" or ct.endswith("+json")


async def require_json(request: Request) -> None:
    if request.method == "POST" and not is_json(request):
        raise APIError(415, f"send the request as application/json (got {content_type(request) or 'no type'!r})",
                       "unsupported_media_type")


#: Form fields holding JSON objects (sampling overrides, the decoding schedule) in a multipart request.
JSON_FORM_FIELDS = frozenset({"text_sampling", "image_sampling", "decoding"})
#: Form fields that are numbers or booleans: multipart sends text, JSON must send the typed value (the models
#: are strict), so these are converted when their text is one.
INT_FORM_FIELDS = frozenset({"seed", "n", "max_new_tokens", "image_area", "partial_images", "output_compression",
                             "preview_every_rows"})
FLOAT_FORM_FIELDS = frozenset({"guidance_scale"})
BOOL_FORM_FIELDS = frozenset({"stream", "include_record"})
_BOOL_TEXT = {"true": True, "1": True, "false": False, "0": False}


def form_value(name: str, text: str) -> Any:
    """A multipart text field as the JSON value it stands for; other text stays text (the model then
    refuses it with a 400 naming the field)."""
    if name in JSON_FORM_FIELDS:
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise bad_request(f"{name} must be a JSON object", "invalid_value", name) from None
    word = text.strip()
    if name in INT_FORM_FIELDS and word.lstrip("-").isdigit():
        return int(word)
    if name in FLOAT_FORM_FIELDS:
        try:
            return float(word)
        except ValueError:
            return text
    if name in BOOL_FORM_FIELDS and word.lower() in _BOOL_TEXT:
        return _BOOL_TEXT[word.lower()]
    return text


async def read_multipart(request: Request, file_fields: frozenset[str], max_files: int, max_bytes: int,
                         unsupported: Mapping[str, str] | None = None,
                         accepts: str = "multipart/form-data") -> tuple[dict[str, Any], list[str | bytes]]:
    """A multipart form → (scalar fields, file contents in order). Files may come under any name in
    ``file_fields`` (``image``, ``image[]``, …) as uploads (bytes) or as base64 / data-URL text (str);
    a repeated scalar field is an error, and so is a field named in ``unsupported`` (file or text: a 400
    with its message). Any other content type is a 415 that says what the route takes (``accepts``)."""
    if content_type(request) != "multipart/form-data":
        raise APIError(415, f"this route takes {accepts} (got {content_type(request) or 'no content type'!r}); "
                       f"send images as file fields, e.g. curl -F 'image=@photo.png'", "unsupported_media_type")
    try:
        form = await request.form(max_files=max_files, max_fields=64, max_part_size=max_bytes)
    except MultiPartException as exc:
        raise bad_request(f"malformed multipart body: {exc.message}", "invalid_multipart") from None
    fields: dict[str, Any] = {}
    files: list[str | bytes] = []
    try:
        for name, value in form.multi_items():
            if unsupported and name in unsupported:
                raise bad_request(unsupported[name], "unsupported_value", name)
            if name in file_fields:
                data = await value.read() if isinstance(value, UploadFile) else value
                if isinstance(data, bytes) and len(data) > max_bytes:
                    raise APIError(413, f"image is larger than {max_bytes} bytes", "image_too_large", name)
                files.append(data)
            elif isinstance(value, UploadFile):
                raise bad_request(f"unexpected file field {name!r}", "unknown_field", name)
            elif name in fields:
                raise bad_request(f"field {name!r} is given more than once", "invalid_value", name)
            else:
                fields[name] = form_value(name, value)
    finally:
        await form.close()
    return fields, files
