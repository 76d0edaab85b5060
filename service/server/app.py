"""The FastAPI application: lifespan (start and stop the runtime), middleware, routes, error handlers.

``create_app`` only builds objects; nothing is loaded until the app's lifespan starts, and then in
the background, so ``/health`` answers at once and ``/ready`` turns true when the model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.limits import MAX_TEXT_BODY_BYTES
from service.server.docs import router as docs
from service.server.errors import APIError, install_handlers
from service.server.playground import router as playground
from service.server.routes import api, system
from service.server.runtime import Runtime
from service.server.serving_generation import ServingGeneration
from service.server.serving_openai import ServingOpenAIImages
from service.server.settings import Settings

logger = logging.getLogger(__name__)

#: Endpoint label of a path in the metrics (unknown paths share one label: bounded cardinality). The
#: generation endpoints use the same labels in the latency histograms.
ENDPOINT_LABELS = {
    "/v1/t2i": "t2i", "/v1/x2i": "x2i", "/v1/guidance": "guidance", "/v1/narrative": "narrative",
    "/v1/generate": "generate", "/v1/images/generations": "images_generations", "/v1/images/edits": "images_edits",
    "/v1/models": "models", "/v1/records": "records", "/health": "health", "/ready": "ready", "/metrics": "metrics",
    "/": "playground", "/docs": "docs",
}


def endpoint_label(path: str) -> str:
    if path in ENDPOINT_LABELS:
        return ENDPOINT_LABELS[path]
    if path.startswith("/v1/records/"):
        return "records"
    if path.startswith("/docs/"):
        return "docs"
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


class BodyLimitMiddleware:
    """Refuses bodies over the route's limit with 413, by Content-Length up front or while streaming in:
    routes that take images allow ``image_limit`` bytes, the others ``MAX_TEXT_BODY_BYTES``, so a route
    that takes a prompt cannot be made to buffer and parse tens of megabytes."""

    def __init__(self, app: ASGIApp, image_limit: int) -> None:
        self.app, self.image_limit = app, image_limit

    def limit_for(self, path: str) -> int:
        return self.image_limit if path.rstrip("/") in IMAGE_ROUTES else MAX_TEXT_BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        too_large = APIError(413, f"request body is larger than {limit} bytes", "body_too_large")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(send, too_large)
            return
        seen = 0
        over = False

        async def limited() -> Message:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # stop reading: the app sees a client that went away
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def sending(message: Message) -> None:
            if not over:  # once over the limit, the answer is ours (413), not what the app made of it
                await send(message)

        try:
            await self.app(scope, limited, sending)
        except Exception:
            if not over:
                raise
        if over:
            await _send_error(send, too_large)


async def _send_error(send: Send, exc: APIError) -> None:
    body = json.dumps(exc.body()).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def max_body_bytes(settings: Settings) -> int:
    """Three images as base64 plus room for the other fields."""
    return 3 * (settings.max_image_bytes * 4 // 3 + 1024) + 2**20


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    runtime = runtime or Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(runtime.start())
        app.state.loading = loading
        try:
            yield
        finally:
            await runtime.drain(settings.shutdown_grace_seconds)
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
                    "and operations endpoints. Errors use one shape: {\"error\": {message, type, param, code}}.",
        lifespan=lifespan,
        docs_url=None,  # served by service.server.docs from packaged assets, not a CDN
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.serving_generation = ServingGeneration(runtime)
    app.state.serving_openai = ServingOpenAIImages(runtime)
    install_handlers(app)
    app.include_router(system)
    app.include_router(api)
    app.include_router(playground)
    app.include_router(docs)
    app.add_middleware(BodyLimitMiddleware, image_limit=max_body_bytes(settings))
    app.add_middleware(RequestMetricsMiddleware, runtime=runtime)
    return app


def describe(settings: Settings) -> dict[str, Any]:
    """What the service runs with, for the startup log (no secrets)."""
    data = settings.model_dump(mode="json", exclude={"api_key"})
    data["api_key"] = "set" if settings.api_key else None
    data["engine"] = settings.engine_kind
    data["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return data


__all__ = ["create_app", "endpoint_label", "describe"]
