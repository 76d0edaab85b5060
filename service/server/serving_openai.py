"""OpenAI's image API (``/v1/images/generations``, ``/v1/images/edits``) on Emu3.5's T2I and X2I,
so the official ``openai`` client works unchanged. ``n`` images are ``n`` generations run side by side
(seeds ``seed``, ``seed+1``, … when a seed is given); each takes an admission slot."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service.prompts import Task
from service.server.errors import APIError, bad_request
from service.server.image_io import b64, encode_image
from service.server.protocol import (
    OpenAIImage,
    OpenAIImageParams,
    OpenAIImagesResponse,
    OpenAIInputTokensDetails,
    OpenAIUsage,
)
from service.server.serving_base import ClientDisconnected, ServingBase, new_request_id, now, run_cancellable
from service.streaming import GenerationInput, Outcome


class ServingOpenAIImages(ServingBase):
    def _check(self, p: OpenAIImageParams) -> None:
        name = self.rt.settings.served_model_name
        if p.model is not None and p.model != name:
            raise APIError(404, f"the model {p.model!r} does not exist; this service serves {name!r}",
                           "model_not_found", "model")
        if p.response_format == "url":
            raise bad_request("response_format 'url' is not supported; images are returned as b64_json",
                              "unsupported_value", "response_format")
        if p.background == "transparent":
            raise bad_request("transparent backgrounds are not supported", "unsupported_value", "background")
        if p.stream:
            raise bad_request("streaming is not supported here; use /v1/t2i or /v1/x2i with stream=true",
                              "unsupported_value", "stream")

    async def create(self, endpoint: str, task: Task, p: OpenAIImageParams, images: list[str | bytes],
                     request: Request) -> Response:
        self.ensure_accepting()
        self._check(p)
        size = None if p.size in (None, "auto") else p.size
        if size is None and task is Task.X2I:
            size = "match_reference"
        pictures = await self.decode_images(list(images), "image")
        inputs = []
        for i in range(p.n):
            seed = None if p.seed is None else (p.seed + i) % (2**63)
            options = self.options(task, size=size, guidance_scale=p.guidance_scale, seed=seed,
                                   max_new_tokens=p.max_new_tokens, image_area=p.image_area,
                                   text=p.text_sampling, image=p.image_sampling)
            inputs.append(GenerationInput(task, p.prompt, tuple(pictures), options))
        try:
            async with asyncio.TaskGroup() as group:
                jobs = [group.create_task(self._one(endpoint, gen, request)) for gen in inputs]
        except BaseExceptionGroup as eg:  # one failed: the others were cancelled; answer with the first
            first = eg.exceptions[0]
            if isinstance(first, ClientDisconnected):
                return Response(status_code=499)
            raise first from None
        outcomes = [job.result() for job in jobs]
        body = await asyncio.to_thread(self._body, outcomes, p)
        return JSONResponse(body)

    async def _one(self, endpoint: str, gen: GenerationInput, request: Request) -> Outcome:
        rid = new_request_id("img")
        slot = await self.admit()
        try:
            prepared = await self.prepare(gen, rid)
            return await run_cancellable(request, self.outcome(endpoint, prepared), self.rt, rid)
        finally:
            self.release(slot)

    def _body(self, outcomes: list[Outcome], p: OpenAIImageParams) -> dict[str, Any]:
        fmt = p.output_format or "png"
        data = []
        for out in outcomes:
            if not out.images:
                raise APIError(500, f"generation {out.request_id} ended without an image ({out.finish_reason})",
                               "no_image")
            if fmt == "png" and out.pngs:
                encoded = out.pngs[0]  # the record's PNG of the same image
            else:
                encoded = encode_image(out.images[0], fmt, p.output_compression)
            data.append(OpenAIImage(b64_json=b64(encoded)))
        first = outcomes[0].images[0]
        prompt = sum(o.usage.prompt_tokens for o in outcomes)
        prompt_images = sum(o.usage.prompt_visual_tokens for o in outcomes)
        output = sum(o.usage.completion_tokens for o in outcomes)
        usage = OpenAIUsage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output,
                            input_tokens_details=OpenAIInputTokensDetails(text_tokens=prompt - prompt_images,
                                                                          image_tokens=prompt_images))
        return OpenAIImagesResponse(created=now(), data=data, output_format=fmt,
                                    size=f"{first.width}x{first.height}", usage=usage).model_dump(mode="json")
