"""What every serving class shares: admission, turning API fields into generation options, decoding
uploads, running a generation to its outcome (aborting it when the client leaves), and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any, Awaitable, TypeVar

from fastapi import Request

from service.engine.request import SamplingSettings
from service.generation import GenerationOptions
from service.prompts import Task, defaults_for
from service.server.errors import APIError, bad_request
from service.server.image_io import image_bytes_from_text, open_image
from service.server.limiter import Overloaded, Slot
from service.server.protocol import SamplingOverrides
from service.server.runtime import Runtime
from service.streaming import Finished, GenerationInput, GenerationInputError, Outcome, Prepared

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


def new_request_id(prefix: str = "gen") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def merge_sampling(default: SamplingSettings, over: SamplingOverrides | None, param: str) -> SamplingSettings | None:
    if over is None or over.model_dump(exclude_none=True) == {}:
        return None
    try:
        return SamplingSettings(
            top_k=over.top_k if over.top_k is not None else default.top_k,
            top_p=over.top_p if over.top_p is not None else default.top_p,
            temperature=over.temperature if over.temperature is not None else default.temperature,
        )
    except ValueError as exc:
        raise bad_request(str(exc), "invalid_value", param) from None


async def run_cancellable(request: Request, work: Awaitable[T], runtime: Runtime, request_id: str) -> T:
    """Await ``work`` while watching the connection: if the client disconnects first, cancel the work
    (which aborts the engine pair) and raise :class:`ClientDisconnected`."""
    task = asyncio.ensure_future(work)
    runtime.inflight[request_id] = task

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        runtime.metrics.disconnects.inc()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        runtime.inflight.pop(request_id, None)
        if not task.done():
            task.cancel()


class ServingBase:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    @property
    def variant(self):
        return self.rt.settings.model_variant

    # ---- admission --------------------------------------------------------------------------------
    def ensure_accepting(self) -> None:
        state = self.rt.state
        if state == "loading":
            raise APIError(503, "the model is still loading", "model_loading", headers={"Retry-After": "10"})
        if state in ("draining", "stopped"):
            raise APIError(503, "the service is shutting down", "shutting_down")
        if state == "failed":
            raise APIError(503, f"the service failed to start: {self.rt.error}", "engine_failed")

    async def admit(self) -> Slot:
        self.ensure_accepting()
        try:
            return await self.rt.limiter.acquire()
        except Overloaded as exc:
            raise APIError(429, str(exc), "overloaded", headers={"Retry-After": str(exc.retry_after)}) from None

    @staticmethod
    def release(slot: Slot) -> None:
        slot.release()

    # ---- inputs -----------------------------------------------------------------------------------
    def options(self, task: Task, *, size: str | None, guidance_scale: float | None, seed: int | None,
                max_new_tokens: int | None, image_area: int | None, text: SamplingOverrides | None,
                image: SamplingOverrides | None) -> GenerationOptions:
        d = defaults_for(task, self.variant)
        return GenerationOptions(
            size=size, cfg_scale=guidance_scale, max_new_tokens=max_new_tokens,
            text=merge_sampling(d.text, text, "text_sampling"),
            image=merge_sampling(d.image, image, "image_sampling"),
            seed=seed, image_area=image_area, variant=self.variant)

    async def decode_images(self, images: list[str | bytes], param: str) -> list[Any]:
        """Uploaded images (base64 text or raw bytes) → RGB PIL images, decoded off the event loop."""
        s = self.rt.settings

        def one(i: int, item: str | bytes):
            name = f"{param}[{i}]"
            raw = item if isinstance(item, bytes) else image_bytes_from_text(item, s.max_image_bytes, name)
            return open_image(raw, s.max_image_bytes, s.max_image_pixels, name)

        return await asyncio.to_thread(lambda: [one(i, x) for i, x in enumerate(images)])

    async def prepare(self, gen: GenerationInput, request_id: str) -> Prepared:
        try:
            return await self.rt.runner.prepare(gen, request_id)
        except GenerationInputError as exc:
            raise bad_request(str(exc), "invalid_generation") from None

    # ---- running ----------------------------------------------------------------------------------
    async def outcome(self, endpoint: str, prepared: Prepared) -> Outcome:
        """Run to the end (no events forwarded) and record the metrics."""
        result: Outcome | None = None
        async with contextlib.aclosing(self.rt.runner.run(prepared)) as events:
            async for ev in events:
                if isinstance(ev, Finished):
                    result = ev.outcome
        assert result is not None
        await self.finish(endpoint, result)
        return result

    async def finish(self, endpoint: str, out: Outcome) -> None:
        """Metrics and the record file of a finished generation."""
        m = self.rt.metrics
        m.latency.labels(endpoint).observe(out.seconds)
        if out.time_to_first_token is not None:
            m.ttft.labels(endpoint).observe(out.time_to_first_token)
        for seconds in out.image_seconds:
            m.image_seconds.observe(seconds)
        m.prompt_tokens.inc(out.usage.prompt_tokens)
        m.text_tokens.inc(out.usage.text_tokens)
        m.visual_tokens.inc(out.usage.visual_tokens)
        m.images.inc(len(out.images))
        if self.rt.records is not None and out.finish_reason != "abort":
            await asyncio.to_thread(self.rt.records.save, out.request_id, out.record)


def now() -> int:
    return int(time.time())
