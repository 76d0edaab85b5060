"""OpenAI's image API (``/v1/images/generations``, ``/v1/images/edits``) on Emu3.5's T2I and X2I,
so the official ``openai`` client works unchanged, streaming included.

``n`` images are ``n`` guided generations run side by side (seeds ``seed``, ``seed+1``, … when a seed
is given), each taking an admission slot, as JSON or as one merged stream. What each OpenAI field maps
to is decided in :mod:`service.server.openai.mapping`. Unknown fields are accepted and logged.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from service.prompts import Task
from service.schema.common import decoding_choice, sampling_override
from service.server.core.errors import APIError, bad_request
from service.server.core.serving_base import SSE_PING_SECONDS, Admitted, Job, ServingBase, now
from service.server.openai.mapping import DEFAULT_COMPRESSION, OpenAIOutput, quality_preset, size_spec
from service.server.openai.protocol import OpenAIImageEditParams, OpenAIImageParams
from service.server.openai.render import OpenAIStreamRenderer, openai_error_event, openai_images_body
from service.task import GenerationInput, GenerationOptions, Outcome, PreviewSchedule

logger = logging.getLogger(__name__)


#: Characters of the field names a Warning header quotes (the rest is cut).
WARNING_MAX_CHARS = 256


@dataclass(frozen=True)
class OpenAIJob:
    """The rendering side of one OpenAI request: the output style, and the stream's renderer."""

    output: OpenAIOutput
    renderer: OpenAIStreamRenderer
    ignored: tuple[str, ...] = ()  # unknown fields accepted and ignored: named in a Warning header

    @property
    def headers(self) -> dict[str, str]:
        """``Warning: 299 - "ignored unknown fields: …"`` (RFC 7234's miscellaneous persistent warning)
        when fields were ignored, so a typo such as ``sise`` does not pass unnoticed."""
        if not self.ignored:
            return {}
        names = ", ".join(self.ignored)
        # a client's field names: printable ASCII only in a header (no quotes, no line breaks), bounded
        safe = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in names)[:WARNING_MAX_CHARS]
        return {"Warning": f'299 - "ignored unknown fields: {safe}"'}


class ServingOpenAIImages(ServingBase):
    job_params = {"images_generations": OpenAIImageParams, "images_edits": OpenAIImageEditParams}

    def _check(self, endpoint: str, p: OpenAIImageParams) -> tuple[str, ...]:
        """Refuse what cannot be honoured; return the unknown fields (accepted, ignored, logged)."""
        name = self.rt.settings.served_model_name
        if p.model is not None and p.model != name:
            raise APIError(404, f"the model {p.model!r} does not exist; this service serves {name!r}",
                           "model_not_found", "model")
        if p.response_format == "url":
            raise bad_request("response_format 'url' is not supported; images are returned as b64_json",
                              "unsupported_value", "response_format")
        if p.background == "transparent":
            raise bad_request("transparent backgrounds are not supported: Emu3.5 draws opaque images",
                              "unsupported_value", "background")
        unknown = p.unknown_fields()
        if unknown:
            logger.info("%s: accepted and ignored unknown fields %s", endpoint, ", ".join(unknown))
        return tuple(unknown)

    async def job(self, endpoint: str, task: Task, p: OpenAIImageParams, images: list[str | bytes],
                  request: Request) -> Job:
        ignored = self._check(endpoint, p)
        size = size_spec(p.size, task)
        quality, area_scale = quality_preset(p.quality)
        pictures = tuple(await self.decode_images(list(images), "image"))
        inputs = []
        for i in range(p.n):
            seed = None if p.seed is None else (p.seed + i) % (2**63)
            options = GenerationOptions(
                size=size, cfg_scale=p.guidance_scale, max_new_tokens=p.max_new_tokens,
                text=sampling_override(p.text_sampling), image=sampling_override(p.image_sampling),
                seed=seed, image_area=p.image_area, variant=self.variant, area_scale=area_scale,
                fit_size_to_area=True, decoding=decoding_choice(p.decoding))
            inputs.append(GenerationInput(task, p.prompt, pictures, options))
        partials = p.partial_images or 0
        output = OpenAIOutput(p.output_format or "png", DEFAULT_COMPRESSION if p.output_compression is None
                              else p.output_compression, quality,
                              "image_edit" if task is Task.X2I else "image_generation", partials)
        return Job(endpoint, inputs, id_prefix="img", stream=bool(p.stream),
                   previews=PreviewSchedule.spread(partials) if partials else None,
                   options=OpenAIJob(output, OpenAIStreamRenderer(output), ignored))

    async def render(self, job: Job, outcomes: list[Outcome]) -> Response:
        body = await asyncio.to_thread(openai_images_body, outcomes, job.options.output, now())
        return JSONResponse(body, headers=job.options.headers)

    def stream(self, job: Job, admitted: list[Admitted], events: AsyncIterator[dict[str, str]]) -> Response:
        ids = ",".join(a.prepared.request.request_id for a in admitted)
        return EventSourceResponse(events, ping=SSE_PING_SECONDS, headers={"X-Request-Id": ids, **job.options.headers})

    async def render_event(self, job: Job, index: int, ev: Any) -> dict[str, str] | None:
        renderer: OpenAIStreamRenderer = job.options.renderer
        if not renderer.encodes(ev):  # nothing to encode: no thread hop for each row drawn
            return renderer.message(index, ev, now())
        return await asyncio.to_thread(renderer.message, index, ev, now())

    def error_event(self, job: Job, message: str, code: str) -> dict[str, str]:
        return openai_error_event(message, code)
