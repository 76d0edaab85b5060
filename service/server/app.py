"""The FastAPI application: lifespan (start and stop the runtime), middleware, routes, error handlers.

``create_app`` only builds objects; nothing is loaded until the app's lifespan starts, and then in
the background, so ``/health`` answers at once and ``/ready`` turns true when the model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.jobs.outage import StoreError
from service.jobs.redact import redact_store_url
from service.limits import BODY_BYTES_PER_EXTRA_SECOND, MAX_TEXT_BODY_BYTES
from service.server.core.errors import APIError, error_response, install_handlers, send_closing_error
from service.server.core.jobs import store_error
from service.server.core.openapi import install as install_openapi
from service.server.core.runtime import Runtime
from service.server.emu35.routes import router as emu35_routes
from service.server.emu35.serving import ServingGeneration
from service.server.jobs.executor import Jobs, StoreWaitExpired
from service.server.jobs.routes import router as jobs_routes
from service.server.openai.routes import router as openai_routes
from service.server.openai.serving import ServingOpenAIImages
from service.server.ops.docs import router as docs
from service.server.ops.guide import router as guide
from service.server.ops.playground import router as playground
from service.server.ops.routes import router as operations
from service.server.ops.routes import v1 as operations_v1
from service.settings import Settings
from service.task import engine_name

logger = logging.getLogger(__name__)

#: Endpoint label of a path in the metrics (unknown paths share one label: bounded cardinality). The
#: generation endpoints use the same labels in the latency histograms.
ENDPOINT_LABELS = {
    "/v1/t2i": "t2i", "/v1/x2i": "x2i", "/v1/guidance": "guidance", "/v1/narrative": "narrative",
    "/v1/generate": "generate", "/v1/images/generations": "images_generations", "/v1/images/edits": "images_edits",
    "/v1/models": "models", "/v1/records": "records", "/v1/jobs": "jobs", "/health": "health", "/ready": "ready",
    "/metrics": "metrics",
    "/": "playground", "/docs": "docs", "/guide": "guide",
}


def endpoint_label(path: str) -> str:
    if path in ENDPOINT_LABELS:
        return ENDPOINT_LABELS[path]
    if path.startswith("/v1/records/"):
        return "records"
    if path.startswith("/v1/jobs/"):
        return "jobs"
    if path.startswith("/docs/"):
        return "docs"
    if path.startswith("/guide/"):
        return "guide"
    return "other"


class RequestMetricsMiddleware:
    """Counts every answered request by endpoint and status (errors from any layer included), and gives
    every answer an ``X-Request-Id`` (the client's own, or a new one) to quote in a bug report."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app, self.runtime = app, runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        request_id = incoming[:128] if incoming else uuid.uuid4().hex.encode()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"x-request-id" for k, _ in headers):  # every answer, errors too
                    message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            label = endpoint_label(scope.get("path", ""))
            self.runtime.metrics.requests.labels(label, str(status["code"])).inc()


#: Routes whose bodies carry images; every other route takes at most MAX_TEXT_BODY_BYTES.
IMAGE_ROUTES = frozenset({"/v1/x2i", "/v1/generate", "/v1/guidance", "/v1/narrative", "/v1/images/edits"})


class BodyGuardMiddleware:
    """Bounds how much a request body may be and how long it may take to arrive.

    Size: bodies over the route's limit get 413, by Content-Length up front or while streaming in: routes
    that take images allow ``image_limit`` bytes, the others ``MAX_TEXT_BODY_BYTES``, so a route that
    takes a prompt cannot be made to buffer and parse tens of megabytes.

    Time: the body must be in within ``timeout`` seconds of the request's start plus one second per
    ``BODY_BYTES_PER_EXTRA_SECOND`` received, else 408: a client sending a byte at a time would otherwise
    hold its connection, and its share of the connection cap, for ever, while a large upload over a slow
    but steady link still gets through (the headers are timed by ``service.server.core.connections``).

    Either way the app sees a client that went away, the answer is the guard's, and the connection is
    closed (the rest of the body is never read)."""

    def __init__(self, app: ASGIApp, image_limit: int, timeout: float) -> None:
        self.app, self.image_limit, self.timeout = app, image_limit, timeout

    def limit_for(self, path: str) -> int:
        return self.image_limit if path.rstrip("/") in IMAGE_ROUTES else MAX_TEXT_BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        too_large = APIError(413, f"request body is larger than {limit} bytes", "body_too_large")
        too_slow = APIError(408, f"the request body did not arrive in time ({self.timeout:g} s, plus 1 s per "
                                 f"{BODY_BYTES_PER_EXTRA_SECOND} bytes received)", "request_timeout")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await send_closing_error(send, too_large)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        seen = 0
        body_done = False
        cut: APIError | None = None

        async def guarded() -> Message:
            nonlocal seen, deadline, body_done, cut
            if cut is not None:
                return {"type": "http.disconnect"}
            if body_done:  # only a disconnect is left to wait for: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                cut = too_slow
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                seen += chunk
                deadline += chunk / BODY_BYTES_PER_EXTRA_SECOND
                if seen > limit:  # stop reading: the app sees a client that went away
                    cut = too_large
                    return {"type": "http.disconnect"}
                body_done = not message.get("more_body", False)
            return message

        async def sending(message: Message) -> None:
            if cut is None:  # once cut, the answer is ours, not what the app made of the "disconnect"
                await send(message)

        try:
            await self.app(scope, guarded, sending)
        except Exception:
            if cut is None:
                raise
        if cut is not None:
            await send_closing_error(send, cut)


def max_body_bytes(settings: Settings) -> int:
    """Three images as base64 plus room for the other fields."""
    return 3 * (settings.max_image_bytes * 4 // 3 + 1024) + 2**20


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    """A job store error reaching a route: 503 (retry later) or 507 (full), never a 500."""
    assert isinstance(exc, StoreError)
    return error_response(store_error(exc))


async def open_jobs(runtime: Runtime) -> None:
    """Open the job store and start its worker; a store still unreachable after ``--job-store-wait``, or
    one that cannot be used (a newer schema), fails the start with one log line."""
    try:
        await Jobs.open(runtime)
    except StoreWaitExpired as exc:
        runtime.fail_start(str(exc))
    except Exception as exc:  # noqa: BLE001 - reported by /ready and the log, loudly
        logger.exception("the job store could not be opened")
        runtime.fail_start(f"the job store could not be opened: {type(exc).__name__}: {exc}")


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    runtime = runtime or Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the job store opens beside the model: while it is unreachable /ready answers 503, and after
        # --job-store-wait the start fails with one line saying why
        opening = asyncio.create_task(open_jobs(runtime), name="emu35-job-store-open")
        loading = asyncio.create_task(runtime.start())
        app.state.loading = loading
        try:
            yield
        finally:
            if runtime.jobs is not None:
                runtime.jobs.worker.pause()  # running jobs may finish in the grace; what is cut goes back to the queue
            await runtime.drain(settings.shutdown_grace_seconds)
            if not opening.done():
                opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await opening
            if runtime.jobs is not None:
                await runtime.jobs.close()
            if not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loading
            await runtime.stop()

    app = FastAPI(
        title="emu35-serve",
        version=__version__,
        summary="Emu3.5 text-to-image, any-to-image, visual guidance and visual narrative",
        description="Emu3.5's own endpoints (JSON or server-sent events), an OpenAI-compatible image API, "
                    "and operations endpoints. Errors use one shape: {\"error\": {message, type, param, code}}. "
                    "Before a request reaches its route, any route may answer 503 `too_many_connections` (more "
                    "than --max-connections open) or 408 `request_timeout` (headers not in within "
                    "--header-timeout); both close the connection.",
        lifespan=lifespan,
        docs_url=None,  # served by service.server.ops.docs from packaged assets, not a CDN
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.serving_generation = ServingGeneration(runtime)
    app.state.serving_openai = ServingOpenAIImages(runtime)
    for serving in (app.state.serving_generation, app.state.serving_openai):  # a stored job runs through these
        runtime.job_servings.update(dict.fromkeys(serving.job_params, serving))
    install_handlers(app)
    app.add_exception_handler(StoreError, _store_error)
    install_openapi(app, auth=runtime.api_keys.required)
    for router in (operations, operations_v1, emu35_routes, openai_routes, jobs_routes, playground, docs,
                   guide):
        app.include_router(router)
    app.add_middleware(BodyGuardMiddleware, image_limit=max_body_bytes(settings), timeout=settings.body_timeout)
    app.add_middleware(RequestMetricsMiddleware, runtime=runtime)
    return app


def describe(settings: Settings) -> dict[str, Any]:
    """What the service runs with, for the startup log (no secrets)."""
    data = settings.model_dump(mode="json", exclude={"api_key"})
    data["api_key"] = "set" if settings.api_key else None
    data["job_store"] = redact_store_url(settings.job_store)  # its password is no business of a log
    data["engine"] = engine_name(settings)
    data["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return data


__all__ = ["create_app", "endpoint_label", "describe"]
