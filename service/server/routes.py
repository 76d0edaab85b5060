"""The routes: thin functions that validate, hand over to a serving class, and document the API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from service.limits import MAX_REFERENCE_IMAGES
from service.prompts import Task
from service.server.deps import get_runtime, is_json, optional_api_key, read_multipart, require_api_key, require_json
from service.server.errors import APIError, validation_error
from service.server.metrics import CONTENT_TYPE
from service.server.openapi import error_responses, event_stream_schema, inline_schema
from service.server.protocol import (
    GENERATION_EVENTS,
    GenerateRequest,
    GenerationResponse,
    InterleavedRequest,
    ModelCard,
    ModelList,
    OpenAIImageEditParams,
    OpenAIImageParams,
    OpenAIImagesResponse,
    ServiceStatus,
    T2IRequest,
    X2IRequest,
    openai_events,
)
from service.server.records import valid_record_id
from service.server.runtime import Runtime
from service.server.serving_generation import ServingGeneration
from service.server.serving_openai import ServingOpenAIImages

#: What every generation route may answer besides 200 (401, 408, 413: see service.server.openapi).
_ERRORS = error_responses(400, 415, 429, 503)
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the generation (JSON), or server-sent events when `stream` is true or the client "
                         "accepts `text/event-stream`: text, global_cot, image_cot, image_start, image_progress, "
                         "image, done, error",
          "content": {"text/event-stream": {"schema": event_stream_schema(GENERATION_EVENTS)}}},
    **_ERRORS,
}

system = APIRouter(tags=["operations"])
api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _generation(request: Request) -> ServingGeneration:
    return request.app.state.serving_generation


def _openai(request: Request) -> ServingOpenAIImages:
    return request.app.state.serving_openai


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def _multipart_openapi(model: type[BaseModel], files: str) -> dict[str, Any]:
    schema = inline_schema(model)
    schema["properties"][files] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {"requestBody": {"content": {"multipart/form-data": {"schema": schema}}, "required": True}}


# ---- operations -----------------------------------------------------------------------------------


@system.head("/health", include_in_schema=False)
@system.get("/health", summary="liveness: fails once the engine died or the start failed", response_model=None,
            responses={200: {"model": ServiceStatus, "description": "alive (also while the model loads)"},
                       503: {"model": ServiceStatus,
                             "description": "the engine died or the start failed; the process is exiting"}})
async def health(runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
    if runtime.alive:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": runtime.state}, status_code=503)


@system.head("/ready", include_in_schema=False)
@system.get("/ready", summary="the engine and the VQ worker are loaded and answering", response_model=None,
            description="Open to all; when the service has an API key, why it is not ready (`error`, which may "
                        "name files) is told only to a caller that sends the key.",
            responses={200: {"model": ServiceStatus, "description": "ready"},
                       503: {"model": ServiceStatus, "description": "loading, failed, draining or dead"}})
async def ready(runtime: Runtime = Depends(get_runtime), trusted: bool = Depends(optional_api_key)) -> JSONResponse:
    ok = await runtime.ready()
    body: dict[str, Any] = {"status": "ready" if ok else runtime.state}
    if runtime.error and trusted:
        body["error"] = runtime.error
    return JSONResponse(body, status_code=200 if ok else 503)


@system.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response,
            dependencies=[Depends(require_api_key)],
            responses={200: {"description": "every emu35_* series",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(runtime: Runtime = Depends(get_runtime)) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


@api.get("/models", response_model=ModelList, tags=["openai"])
async def models(runtime: Runtime = Depends(get_runtime)) -> ModelList:
    return ModelList(data=[ModelCard(id=runtime.settings.served_model_name, created=int(runtime.started_at))])


@api.get("/records/{record_id}", tags=["emu3.5"], summary="a finished generation's .pb record",
         response_class=Response,
         responses={200: {"description": "the emu3p5.story.Story record",
                          "content": {"application/x-protobuf": {"schema": {"type": "string", "format": "binary"}}}},
                    **error_responses(400, 404,
                                      descriptions={404: "no such record, or records are not kept (--output-dir)"})})
async def record(record_id: str, runtime: Runtime = Depends(get_runtime)) -> Response:
    if runtime.records is None:
        raise APIError(404, "records are not kept: start the service with --output-dir", "records_disabled")
    if not valid_record_id(record_id):
        raise APIError(400, f"invalid record id {record_id!r}", "invalid_record_id", "record_id")
    data = runtime.records.load(record_id)
    if data is None:
        raise APIError(404, f"no record {record_id!r}", "record_not_found", "record_id")
    return Response(data, media_type="application/x-protobuf",
                    headers={"Content-Disposition": f'attachment; filename="{record_id}.pb"'})


# ---- Emu3.5 endpoints -----------------------------------------------------------------------------


@api.post("/t2i", tags=["emu3.5"], summary="text to image", response_model=GenerationResponse,
          responses=_GENERATION_RESPONSES, dependencies=[Depends(require_json)])
async def t2i(body: T2IRequest, request: Request) -> Response:
    return await _generation(request).create("t2i", Task.T2I, body, [], request)


@api.post("/x2i", tags=["emu3.5"], summary=f"edit / compose from 1–{MAX_REFERENCE_IMAGES} reference images (JSON or multipart)",
          response_model=GenerationResponse, responses=_GENERATION_RESPONSES,
          openapi_extra={"requestBody": {"content": {
              "application/json": {"schema": inline_schema(X2IRequest)},
              **_multipart_openapi(X2IRequest, "images")["requestBody"]["content"]}, "required": True}})
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
        body = _validate(X2IRequest, data)
        images: list[str | bytes] = list(body.images)
    else:
        fields, images = await read_multipart(request, frozenset({"images", "images[]", "image", "image[]"}),
                                              max_files=MAX_REFERENCE_IMAGES + 1, max_bytes=s.max_image_bytes)
        body = _validate(X2IRequest, {**fields, "images": ["-"] * len(images)})
    return await _generation(request).create("x2i", Task.X2I, body, images, request)


@api.post("/guidance", tags=["emu3.5"], summary="visual guidance: interleaved how-to answer (task howto)",
          response_model=GenerationResponse, responses=_GENERATION_RESPONSES, dependencies=[Depends(require_json)])
async def guidance(body: InterleavedRequest, request: Request) -> Response:
    return await _generation(request).create("guidance", Task.HOWTO, body, list(body.images), request)


@api.post("/narrative", tags=["emu3.5"], summary="visual narrative: interleaved story (task story)",
          response_model=GenerationResponse, responses=_GENERATION_RESPONSES, dependencies=[Depends(require_json)])
async def narrative(body: InterleavedRequest, request: Request) -> Response:
    return await _generation(request).create("narrative", Task.STORY, body, list(body.images), request)


@api.post("/generate", tags=["emu3.5"], summary="any task, named explicitly (explore, vla, …)",
          response_model=GenerationResponse, responses=_GENERATION_RESPONSES, dependencies=[Depends(require_json)])
async def generate(body: GenerateRequest, request: Request) -> Response:
    return await _generation(request).create("generate", body.task, body, list(body.images), request)


# ---- OpenAI-compatible image API ------------------------------------------------------------------


def _openai_responses(family: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": f"the images (JSON), or with `stream: true` server-sent events: `{family}.partial_image` "
                             f"(`partial_images` per image, spread over its rows) then `{family}.completed` with "
                             "`usage`, per image",
              "content": {"text/event-stream": {"schema": event_stream_schema(openai_events(family))}}},
        **_ERRORS,
        **error_responses(404, descriptions={404: "`model` is not the served model"}),
    }
_MASK = "masks are not supported: describe the edit in the prompt"


@api.post("/images/generations", tags=["openai"], summary="OpenAI: create an image (JSON or streamed)",
          response_model=OpenAIImagesResponse, responses=_openai_responses("image_generation"),
          dependencies=[Depends(require_json)])
async def images_generations(body: OpenAIImageParams, request: Request) -> Response:
    return await _openai(request).create("images_generations", Task.T2I, body, [], request)


@api.post("/images/edits", tags=["openai"], summary="OpenAI: edit images (multipart; JSON or streamed answer)",
          response_model=OpenAIImagesResponse, responses=_openai_responses("image_edit"),
          openapi_extra=_multipart_openapi(OpenAIImageEditParams, "image"))
async def images_edits(request: Request) -> Response:
    s = request.app.state.runtime.settings
    fields, images = await read_multipart(request, frozenset({"image", "image[]"}), max_files=MAX_REFERENCE_IMAGES + 2,
                                          max_bytes=s.max_image_bytes, unsupported={"mask": _MASK})
    body = _validate(OpenAIImageEditParams, fields)
    if not 1 <= len(images) <= MAX_REFERENCE_IMAGES:
        raise APIError(400, f"send 1 to {MAX_REFERENCE_IMAGES} images (field 'image' or 'image[]'), got {len(images)}",
                       "invalid_image_count", "image")
    return await _openai(request).create("images_edits", Task.X2I, body, images, request)
