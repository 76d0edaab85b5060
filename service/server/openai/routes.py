"""OpenAI's image API: thin functions that validate, hand over to :class:`ServingOpenAIImages`, and
document the API."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from fastapi.responses import Response

from service.limits import MAX_REFERENCE_IMAGES
from service.prompts import Task
from service.server.core.deps import read_multipart, require_json
from service.server.core.errors import APIError
from service.server.core.openapi import error_responses, event_stream_schema
from service.server.core.routing import GENERATION_ERRORS, multipart_openapi, v1_router, validate
from service.server.openai.protocol import OpenAIImageEditParams, OpenAIImageParams, OpenAIImagesResponse, openai_events
from service.server.openai.serving import ServingOpenAIImages

router = v1_router()


def _openai(request: Request) -> ServingOpenAIImages:
    return request.app.state.serving_openai


def _openai_responses(family: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": f"the images (JSON), or with `stream: true` server-sent events: `{family}.partial_image` "
                             f"(`partial_images` per image, spread over its rows) then `{family}.completed` with "
                             "`usage`, per image",
              "content": {"text/event-stream": {"schema": event_stream_schema(openai_events(family))}}},
        **GENERATION_ERRORS,
        **error_responses(404, descriptions={404: "`model` is not the served model"}),
    }
_MASK = "masks are not supported: describe the edit in the prompt"


@router.post("/images/generations", tags=["openai"], summary="OpenAI: create an image (JSON or streamed)",
          response_model=OpenAIImagesResponse, responses=_openai_responses("image_generation"),
          dependencies=[Depends(require_json)])
async def images_generations(body: OpenAIImageParams, request: Request) -> Response:
    return await _openai(request).create("images_generations", Task.T2I, body, [], request)


@router.post("/images/edits", tags=["openai"], summary="OpenAI: edit images (multipart; JSON or streamed answer)",
          response_model=OpenAIImagesResponse, responses=_openai_responses("image_edit"),
          openapi_extra=multipart_openapi(OpenAIImageEditParams, "image"))
async def images_edits(request: Request) -> Response:
    s = request.app.state.runtime.settings
    fields, images = await read_multipart(request, frozenset({"image", "image[]"}), max_files=MAX_REFERENCE_IMAGES + 2,
                                          max_bytes=s.max_image_bytes, unsupported={"mask": _MASK})
    body = validate(OpenAIImageEditParams, fields)
    if not 1 <= len(images) <= MAX_REFERENCE_IMAGES:
        raise APIError(400, f"send 1 to {MAX_REFERENCE_IMAGES} images (field 'image' or 'image[]'), got {len(images)}",
                       "invalid_image_count", "image")
    return await _openai(request).create("images_edits", Task.X2I, body, images, request)
