"""Operations: liveness, readiness, Prometheus metrics, the model list and stored records."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from service.schema.common import DecodingData, ModelCard, ModelList, ServiceStatus
from service.server.core.deps import get_runtime, optional_api_key, require_api_key
from service.server.core.errors import APIError
from service.server.core.metrics import CONTENT_TYPE
from service.server.core.openapi import error_responses
from service.server.core.records import valid_record_id
from service.server.core.routing import v1_router
from service.server.core.runtime import Runtime
from service.types import Decoding

router = APIRouter(tags=["operations"])
v1 = v1_router()


@router.head("/health", include_in_schema=False)
@router.get("/health", summary="liveness: fails once the engine died or the start failed", response_model=None,
            responses={200: {"model": ServiceStatus, "description": "alive (also while the model loads)"},
                       503: {"model": ServiceStatus,
                             "description": "the engine died or the start failed; the process is exiting"}})
async def health(runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
    if runtime.alive:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": runtime.state}, status_code=503)


@router.head("/ready", include_in_schema=False)
@router.get("/ready", summary="the engine and the VQ worker are loaded and answering", response_model=None,
            description="Open to all; when the service has an API key, why it is not ready (`error`, which may "
                        "name files) is told only to a caller that sends the key.",
            responses={200: {"model": ServiceStatus, "description": "ready"},
                       503: {"model": ServiceStatus, "description": "loading, failed, draining or dead"}})
async def ready(runtime: Runtime = Depends(get_runtime), trusted: bool = Depends(optional_api_key)) -> JSONResponse:
    ok = await runtime.ready()
    state = "loading" if not ok and runtime.state == "ready" else runtime.state  # the job store is not open yet
    body: dict[str, Any] = {"status": "ready" if ok else state, "model_kind": runtime.model_kind,
                            "job_store": runtime.jobs.store.health.state if runtime.jobs is not None else "waiting"}
    if runtime.error and trusted:
        body["error"] = runtime.error
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response,
            dependencies=[Depends(require_api_key)],
            responses={200: {"description": "every emu35_* series",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(runtime: Runtime = Depends(get_runtime)) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


@v1.get("/models", response_model=ModelList, response_model_exclude_none=True, tags=["openai"])
async def models(runtime: Runtime = Depends(get_runtime)) -> ModelList:
    engine = runtime.engine_kind
    # the running engine's own word once it is built (the same as its class's while it loads)
    schedules = list(runtime.runner.schedules if runtime.runner is not None else engine.schedules())
    default = runtime.settings.default_decoding
    if default is None and schedules:
        default = Decoding(schedules[0])  # type: ignore[arg-type]
    default = default.resolved() if default is not None and schedules else None
    decoding = None if default is None else DecodingData(mode=default.mode, draft_len=default.draft_len,
                                                         window=default.window)
    return ModelList(data=[ModelCard(id=runtime.settings.served_model_name, created=int(runtime.started_at),
                                     model_kind=runtime.model_kind, engine=engine.name, schedules=schedules,
                                     decoding=decoding)])


@v1.get("/records/{record_id}", tags=["emu3.5"], summary="a finished generation's .pb record",
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
