"""Emu3.5's own endpoints (``/v1/t2i``, ``/v1/x2i``, ``/v1/guidance``, ``/v1/narrative``,
``/v1/generate``): one JSON answer, or server-sent events as the answer is generated.

Everything that can make a request invalid (fields, images, sizes, context, capacity) is checked
before a response starts, so errors are proper 4xx statuses even for streams; a failure after the
stream started is an ``error`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from service.prompts import Task
from service.server.errors import APIError
from service.server.image_io import b64, encode_image
from service.server.limiter import Slot
from service.server.protocol import (
    GenerationParams,
    GenerationResponse,
    ImageData,
    SegmentData,
    Timings,
    UsageData,
)
from service.server.serving_base import ClientDisconnected, ServingBase, new_request_id, now, run_cancellable
from service.streaming import (
    Event,
    Finished,
    GenerationInput,
    ImageBegin,
    ImageOut,
    ImageProgress,
    Outcome,
    Prepared,
    TextOut,
)

logger = logging.getLogger(__name__)

#: Seconds between keep-alive comments on an idle stream (proxies drop silent connections).
SSE_PING_SECONDS = 15


def wants_stream(params: GenerationParams, request: Request) -> bool:
    return params.stream or "text/event-stream" in request.headers.get("accept", "")


def _png(image) -> str:
    return b64(encode_image(image, "png"))


class ServingGeneration(ServingBase):
    async def create(self, endpoint: str, task: Task, params: GenerationParams, images: list[str | bytes],
                     request: Request) -> Response:
        self.ensure_accepting()
        options = self.options(task, size=params.size_spec(), guidance_scale=params.guidance_scale,
                               seed=params.seed, max_new_tokens=params.max_new_tokens,
                               image_area=params.image_area, text=params.text_sampling,
                               image=params.image_sampling)
        pictures = await self.decode_images(images, "images")
        gen = GenerationInput(task, params.prompt, tuple(pictures), options)
        rid = new_request_id()
        slot = await self.admit()
        try:
            prepared = await self.prepare(gen, rid)
        except BaseException:
            self.release(slot)
            raise
        if wants_stream(params, request):
            return EventSourceResponse(self._events(endpoint, prepared, slot, params.preview_every_rows),
                                       ping=SSE_PING_SECONDS, headers={"X-Request-Id": rid})
        try:
            out = await run_cancellable(request, self.outcome(endpoint, prepared), self.rt, rid)
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            self.release(slot)
        body = await asyncio.to_thread(self.response_body, out)
        return JSONResponse(body, headers={"X-Request-Id": rid})

    def response_body(self, out: Outcome) -> dict[str, Any]:
        """The JSON answer (PNG encoding is CPU work: call off the event loop)."""
        pngs = out.pngs if len(out.pngs) == len(out.images) else [encode_image(im, "png") for im in out.images]
        images = [ImageData(b64_json=b64(data), width=im.width, height=im.height) for im, data in zip(out.images, pngs)]
        return GenerationResponse(
            id=out.request_id, created=now(), model=self.rt.settings.served_model_name, task=out.task,
            images=images, text=out.text,
            segments=[SegmentData(type=s.type, text=s.text, image_index=s.image_index) for s in out.segments],
            record=b64(out.record),
            usage=UsageData(prompt_tokens=out.usage.prompt_tokens, completion_tokens=out.usage.completion_tokens,
                            visual_tokens=out.usage.visual_tokens),
            finish_reason=out.finish_reason,  # type: ignore[arg-type]
            timings=Timings(seconds=round(out.seconds, 4), time_to_first_token=out.time_to_first_token),
        ).model_dump(mode="json", exclude_none=True)

    # ---- streaming --------------------------------------------------------------------------------
    async def _events(self, endpoint: str, prepared: Prepared, slot: Slot,
                      preview_every_rows: int | None) -> AsyncIterator[dict[str, str]]:
        rid = prepared.request.request_id
        task = asyncio.current_task()
        if task is not None:
            self.rt.inflight[rid] = task
        completed = False
        try:
            async with contextlib.aclosing(self.rt.runner.run(prepared, preview_every_rows)) as events:
                async for ev in events:
                    if isinstance(ev, Finished):
                        await self.finish(endpoint, ev.outcome)
                    yield await self._sse(ev)
            completed = True
        except asyncio.CancelledError:
            if self.rt.state not in ("draining", "stopped"):
                self.rt.metrics.disconnects.inc()
            raise
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            logger.exception("generation %s failed mid-stream", rid)
            code = exc.code if isinstance(exc, APIError) else "generation_failed"
            yield {"event": "error", "data": json.dumps({"message": f"{type(exc).__name__}: {exc}", "code": code})}
        finally:
            self.rt.inflight.pop(rid, None)
            self.release(slot)
            if not completed:
                logger.info("stream %s ended early", rid)

    async def _sse(self, ev: Event) -> dict[str, str]:
        if isinstance(ev, TextOut):
            data: dict[str, Any] = {"delta": ev.delta}
            name = ev.channel
        elif isinstance(ev, ImageBegin):
            name, data = "image_start", {"index": ev.index, "width": ev.width, "height": ev.height}
        elif isinstance(ev, ImageProgress):
            name, data = "image_progress", {"index": ev.index, "rows": ev.rows, "total_rows": ev.total_rows}
            if ev.preview is not None:
                data["b64_json"] = await asyncio.to_thread(_png, ev.preview)
        elif isinstance(ev, ImageOut):
            name = "image"
            data = {"index": ev.index, "b64_json": await asyncio.to_thread(_png, ev.image),
                    "width": ev.image.width, "height": ev.image.height}
        elif isinstance(ev, Finished):
            body = await asyncio.to_thread(self.response_body, _without_images(ev.outcome))
            name = "done"
            data = {k: body[k] for k in ("id", "task", "text", "segments", "usage", "record", "finish_reason",
                                         "timings")}
        else:  # pragma: no cover - every event type is handled above
            raise TypeError(f"unknown event {ev!r}")
        return {"event": name, "data": json.dumps(data)}


def _without_images(out: Outcome) -> Outcome:
    """The ``done`` event does not repeat the images already sent as ``image`` events."""
    return Outcome(**{**out.__dict__, "images": [], "pngs": []})
