"""OpenAI's image API (``/v1/images/generations``, ``/v1/images/edits``) on Emu3.5's T2I and X2I,
so the official ``openai`` client works unchanged. ``n`` images are ``n`` generations run side by side
(seeds ``seed``, ``seed+1``, … when a seed is given); each takes an admission slot."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service.prompts import Task
from service.server.errors import APIError, bad_request
from service.server.protocol import OpenAIImageParams
from service.server.render import openai_images_body
from service.server.serving_base import Job, ServingBase, now, sampling_override
from service.task import GenerationInput, GenerationOptions, Outcome


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

    async def job(self, endpoint: str, task: Task, p: OpenAIImageParams, images: list[str | bytes],
                  request: Request) -> Job:
        self._check(p)
        size = None if p.size in (None, "auto") else p.size
        if size is None and task is Task.X2I:
            size = "match_reference"
        pictures = tuple(await self.decode_images(list(images), "image"))
        inputs = []
        for i in range(p.n):
            seed = None if p.seed is None else (p.seed + i) % (2**63)
            options = GenerationOptions(
                size=size, cfg_scale=p.guidance_scale, max_new_tokens=p.max_new_tokens,
                text=sampling_override(p.text_sampling), image=sampling_override(p.image_sampling),
                seed=seed, image_area=p.image_area, variant=self.variant)
            inputs.append(GenerationInput(task, p.prompt, pictures, options))
        return Job(endpoint, inputs, id_prefix="img", options=p)

    async def render(self, job: Job, outcomes: list[Outcome]) -> Response:
        return JSONResponse(await asyncio.to_thread(openai_images_body, outcomes, job.options, now()))
