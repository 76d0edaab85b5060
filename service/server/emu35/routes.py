"""Emu3.5's own endpoints: thin functions that validate, hand over to :class:`ServingGeneration`, and
document the API."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from fastapi.responses import Response

from service.limits import MAX_REFERENCE_IMAGES
from service.prompts import Task
from service.schema.emu35 import (
    GENERATION_EVENTS,
    GenerateRequest,
    GenerationResponse,
    InterleavedRequest,
    T2IRequest,
    X2IRequest,
)
from service.server.core.deps import is_json, read_multipart, require_json
from service.server.core.errors import APIError
from service.server.core.openapi import event_stream_schema, inline_schema
from service.server.core.routing import GENERATION_ERRORS, multipart_openapi, v1_router, validate
from service.server.core.runtime import Runtime
from service.server.emu35.serving import ServingGeneration

GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the generation (JSON), or server-sent events when `stream` is true or the client "
                         "accepts `text/event-stream`: text, global_cot, image_cot, image_start, image_progress, "
                         "image, done, error",
          "content": {"text/event-stream": {"schema": event_stream_schema(GENERATION_EVENTS)}}},
    **GENERATION_ERRORS,
}

router = v1_router()


def _generation(request: Request) -> ServingGeneration:
    return request.app.state.serving_generation


@router.post("/t2i", tags=["emu3.5"], summary="text to image", response_model=GenerationResponse,
          responses=GENERATION_RESPONSES, dependencies=[Depends(require_json)])
async def t2i(body: T2IRequest, request: Request) -> Response:
    return await _generation(request).create("t2i", Task.T2I, body, [], request)


@router.post("/x2i", tags=["emu3.5"], summary=f"edit / compose from 1–{MAX_REFERENCE_IMAGES} reference images (JSON or multipart)",
          response_model=GenerationResponse, responses=GENERATION_RESPONSES,
          openapi_extra={"requestBody": {"content": {
              "application/json": {"schema": inline_schema(X2IRequest)},
              **multipart_openapi(X2IRequest, "images")["requestBody"]["content"]}, "required": True}})
async def x2i(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    s = runtime.settings
    if is_json(request):
        try:
            data = await request.json()
        except ValueError:
            raise APIError(400, "request body is not valid JSON", "invalid_json") from None
        except RecursionError:
            raise APIError(400, "request body nests too deeply", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", "invalid_json")
        body = validate(X2IRequest, data)
        images: list[str | bytes] = list(body.images)
    else:
        fields, images = await read_multipart(request, frozenset({"images", "images[]", "image", "image[]"}),
                                              max_files=MAX_REFERENCE_IMAGES + 1, max_bytes=s.max_image_bytes,
                                              accepts="application/json or multipart/form-data")
        body = validate(X2IRequest, {**fields, "images": ["-"] * len(images)})
    return await _generation(request).create("x2i", Task.X2I, body, images, request)


@router.post("/guidance", tags=["emu3.5"], summary="visual guidance: interleaved how-to answer (task howto)",
          response_model=GenerationResponse, responses=GENERATION_RESPONSES, dependencies=[Depends(require_json)])
async def guidance(body: InterleavedRequest, request: Request) -> Response:
    return await _generation(request).create("guidance", Task.HOWTO, body, list(body.images), request)


@router.post("/narrative", tags=["emu3.5"], summary="visual narrative: interleaved story (task story)",
          response_model=GenerationResponse, responses=GENERATION_RESPONSES, dependencies=[Depends(require_json)])
async def narrative(body: InterleavedRequest, request: Request) -> Response:
    return await _generation(request).create("narrative", Task.STORY, body, list(body.images), request)


@router.post("/generate", tags=["emu3.5"], summary="any task, named explicitly (explore, vla, …)",
          response_model=GenerationResponse, responses=GENERATION_RESPONSES, dependencies=[Depends(require_json)])
async def generate(body: GenerateRequest, request: Request) -> Response:
    return await _generation(request).create("generate", body.task, body, list(body.images), request)
