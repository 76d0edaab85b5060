"""Emu3.5's own endpoints (``/v1/t2i``, ``/v1/x2i``, ``/v1/guidance``, ``/v1/narrative``,
``/v1/generate``): one JSON answer, or server-sent events as the answer is generated.

Everything that can make a request invalid (fields, images, sizes, context, capacity) is checked
before a response starts, so errors are proper 4xx statuses even for streams; a failure after the
stream started is an ``error`` event. The ``done`` event names the record (``record_id``, and
``record_url`` when records are stored) instead of repeating every image; ``include_record: true``
puts the record itself in it.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from service.prompts import Task
from service.schema.common import decoding_choice, sampling_override
from service.schema.emu35 import GenerateRequest, GenerationParams, InterleavedRequest, T2IRequest, X2IRequest
from service.server.core.serving_base import SSE_PING_SECONDS, Admitted, Job, ServingBase, now
from service.server.emu35.render import done_event, error_event, generation_body, sse_message
from service.task import Finished, GenerationInput, GenerationOptions, Outcome, PreviewSchedule


def wants_stream(params: GenerationParams, request: Request) -> bool:
    return params.stream or "text/event-stream" in request.headers.get("accept", "")


class ServingGeneration(ServingBase):
    job_params = {"t2i": T2IRequest, "x2i": X2IRequest, "guidance": InterleavedRequest,
                  "narrative": InterleavedRequest, "generate": GenerateRequest}

    async def job(self, endpoint: str, task: Task, params: GenerationParams, images: list[str | bytes],
                  request: Request) -> Job:
        options = GenerationOptions(
            size=params.size_spec(), cfg_scale=params.guidance_scale, max_new_tokens=params.max_new_tokens,
            text=sampling_override(params.text_sampling), image=sampling_override(params.image_sampling),
            seed=params.seed, image_area=params.image_area, variant=self.variant, uncond_mode=params.uncond_mode,
            decoding=decoding_choice(params.decoding))
        pictures = await self.decode_images(images, "images")
        return Job(endpoint, [GenerationInput(task, params.prompt, tuple(pictures), options)],
                   stream=wants_stream(params, request),
                   previews=PreviewSchedule.every(params.preview_every_rows) if params.preview_every_rows else None,
                   options=params)

    async def render(self, job: Job, outcomes: list[Outcome]) -> Response:
        (out,) = outcomes
        body = await asyncio.to_thread(generation_body, out, self.rt.settings.served_model_name, now())
        return JSONResponse(body, headers={"X-Request-Id": out.request_id})

    def error_event(self, job: Job, message: str, code: str) -> dict[str, str]:
        return error_event(message, code)

    def stream(self, job: Job, admitted: list[Admitted], events: AsyncIterator[dict[str, str]]) -> Response:
        (one,) = admitted
        return EventSourceResponse(events, ping=SSE_PING_SECONDS,
                                   headers={"X-Request-Id": one.prepared.request.request_id})

    async def render_event(self, job: Job, index: int, ev: Any) -> dict[str, str]:
        if isinstance(ev, Finished):
            out = ev.outcome
            url = f"/v1/records/{out.request_id}" if self.rt.records is not None else None
            return done_event(out, url, job.options.include_record)
        return await asyncio.to_thread(sse_message, ev)
