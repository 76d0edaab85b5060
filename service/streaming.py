"""The task layer's asynchronous generation, as a stream of events the HTTP layer can forward.

``GenerationRunner.prepare`` turns a task, a question, reference images and options into an engine
request (reference images are encoded by the VQ worker; sizes and limits are checked, so a bad request
fails here, before any response is started). ``GenerationRunner.run`` then drives the engine, feeds the
ids to the stream parser and yields :class:`Event`s: text deltas per channel, image start / row
progress (with optional decoded previews) / finished image, and finally :class:`Finished` with the
whole outcome (segments, images, the ``.pb`` record, usage, timings). Closing the iterator early (a
client went away) aborts the engine's pair.

No HTTP here and no tensors: images are PIL images, the record is bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Literal, Protocol, Sequence

import numpy as np
from PIL import Image

from service.engine.protocol import AsyncEngine, EngineRequestError
from service.engine.request import GenerationRequest
from service.generation import GenerationOptions, plan_request, record_items
from service.prompts import Task, defaults_for
from service.record import build_story
from service.token_layout import (
    End,
    GlobalCotSegment,
    ImageCotSegment,
    ImageDone,
    ImageRows,
    ImageSegment,
    ImageStarted,
    Segment,
    SegmentDone,
    StreamParser,
    TextDelta,
    TextSegment,
)
from service.tokenizer import Emu35Tokenizer


class ImageCodecAsync(Protocol):
    """The VQ worker's interface (see ``service.vq.worker``)."""

    @property
    def downsample(self) -> int: ...

    async def encode(self, images: Sequence[Image.Image], area: int | None) -> list[np.ndarray]: ...

    async def decode(self, grids: Sequence[np.ndarray]) -> list[Image.Image]: ...


class GenerationInputError(ValueError):
    """The request cannot be run as asked (a client error); the message says why."""


# ---- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Base class of what :meth:`GenerationRunner.run` yields."""


@dataclass(frozen=True)
class TextOut(Event):
    channel: Literal["text", "global_cot", "image_cot"]
    delta: str


@dataclass(frozen=True)
class ImageBegin(Event):
    index: int
    width: int  # pixels
    height: int


@dataclass(frozen=True)
class ImageProgress(Event):
    index: int
    rows: int
    total_rows: int
    preview: Image.Image | None = None


@dataclass(frozen=True)
class ImageOut(Event):
    index: int
    image: Image.Image


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int
    text_tokens: int
    prompt_visual_tokens: int = 0  # reference-image tokens in the prompt


@dataclass(frozen=True)
class SegmentInfo:
    """One part of the answer, in order: its kind, its text or the index of its image."""

    type: Literal["text", "image", "global_cot", "image_cot"]
    text: str | None = None
    image_index: int | None = None


@dataclass
class Outcome:
    """A finished generation (also when it was cut short by the length limit)."""

    request_id: str
    task: Task
    images: list[Image.Image]
    segments: list[SegmentInfo]
    text: str
    record: bytes
    usage: Usage
    finish_reason: str  # "stop" | "length" | "abort"
    time_to_first_token: float | None
    seconds: float
    image_seconds: list[float] = field(default_factory=list)
    pngs: list[bytes] = field(default_factory=list)  # the images as the record holds them (PNG)


@dataclass(frozen=True)
class Finished(Event):
    outcome: Outcome


# ---- preparation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationInput:
    """What a client asked for, already decoded (images are PIL images)."""

    task: Task
    question: str
    images: tuple[Image.Image, ...] = ()
    options: GenerationOptions = GenerationOptions()


@dataclass(frozen=True)
class Prepared:
    input: GenerationInput
    request: GenerationRequest


def image_token_count(height: int, width: int) -> int:
    """Tokens one generated image takes: BOI, the header digits, '*', IMG, then H·(W+1) (DESIGN §3)."""
    return 3 + len(str(height)) + len(str(width)) + height * (width + 1)


class GenerationRunner:
    """Runs generations on one engine and one VQ worker."""

    def __init__(self, engine: AsyncEngine, vq: ImageCodecAsync, tokenizer: Emu35Tokenizer,
                 image_area: int | None = None) -> None:
        self.engine = engine
        self.vq = vq
        self.tok = tokenizer
        self.image_area = image_area  # a service-wide override of every task's default image area

    def area_for(self, gen: GenerationInput) -> int:
        return gen.options.image_area or self.image_area or defaults_for(gen.task, gen.options.variant).image_area

    async def prepare(self, gen: GenerationInput, request_id: str) -> Prepared:
        """Encode the reference images and build the engine request; raise :class:`GenerationInputError`."""
        if len(gen.images) > 3:
            raise GenerationInputError(f"at most 3 reference images are supported, got {len(gen.images)}")
        area = self.area_for(gen)
        options = gen.options
        if options.image_area is None and self.image_area is not None:
            options = GenerationOptions(**{**options.__dict__, "image_area": self.image_area})
        grids = await self.vq.encode(list(gen.images), area) if gen.images else []
        try:
            req = plan_request(self.tok, gen.task, gen.question, grids, options, request_id,
                               max_model_len=self.engine.max_model_len)
            self.engine.check(req)
        except (ValueError, TypeError) as exc:  # EngineRequestError is a ValueError
            raise GenerationInputError(str(exc)) from exc
        if gen.task in (Task.T2I, Task.X2I) and req.target_grid is not None:
            need = image_token_count(*req.target_grid)
            if req.max_new_tokens < need:
                raise GenerationInputError(f"max_new_tokens {req.max_new_tokens} cannot hold a "
                                           f"{req.target_grid[0]}×{req.target_grid[1]}-token image ({need} tokens)")
        return Prepared(gen, req)

    # ---- running ------------------------------------------------------------------------------
    async def run(self, prepared: Prepared, preview_every_rows: int | None = None) -> AsyncIterator[Event]:
        """Drive one generation; the last event is :class:`Finished`. Closing early aborts it."""
        req = prepared.request
        started = time.perf_counter()
        parser = StreamParser(self.tok)
        ids: list[int] = []
        segments: list[Segment] = []
        images: list[Image.Image] = []
        image_started: dict[int, float] = {}
        image_seconds: list[float] = []
        grid_width: dict[int, tuple[int, int]] = {}
        partial: dict[int, list[np.ndarray]] = {}
        ttft: float | None = None
        reason = "abort"
        f = self.vq.downsample
        stream = self.engine.generate(req)
        try:
            async for delta in stream:
                if delta.token_ids and ttft is None:
                    ttft = time.perf_counter() - started
                ids += delta.token_ids
                events = parser.feed(delta.token_ids) if delta.token_ids else []
                if delta.finished:
                    reason = delta.finish_reason or "abort"
                    if not parser.ended:
                        events += parser.finish()
                for ev in events:
                    async for out in self._translate(ev, segments, images, image_started, image_seconds,
                                                     grid_width, partial, preview_every_rows, f):
                        yield out
                if delta.finished:
                    break
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
        outcome = await self._outcome(prepared, ids, segments, images, reason, ttft,
                                      time.perf_counter() - started, image_seconds)
        yield Finished(outcome)

    async def _translate(self, ev, segments, images, image_started, image_seconds, grid, partial,
                         preview_every_rows, f) -> AsyncIterator[Event]:
        """One parser event → zero or more service events (decoding images on the VQ worker)."""
        if isinstance(ev, TextDelta):
            if ev.text:
                yield TextOut(ev.channel, ev.text)
        elif isinstance(ev, ImageStarted):
            image_started[ev.index] = time.perf_counter()
            grid[ev.index] = (ev.height, ev.width)
            partial[ev.index] = []
            yield ImageBegin(ev.index, ev.width * f, ev.height * f)
        elif isinstance(ev, ImageRows):
            total = grid[ev.index][0]
            preview = None
            if preview_every_rows:
                partial[ev.index].append(np.asarray(ev.new_rows))
                before = ev.rows_done - len(ev.new_rows)
                crossed = ev.rows_done // preview_every_rows > before // preview_every_rows
                if crossed and ev.rows_done < total:
                    (preview,) = await self.vq.decode([np.concatenate(partial[ev.index], axis=0)])
            yield ImageProgress(ev.index, ev.rows_done, total, preview)
        elif isinstance(ev, ImageDone):
            (image,) = await self.vq.decode([np.asarray(ev.codes)])
            images.append(image)
            partial.pop(ev.index, None)
            image_seconds.append(time.perf_counter() - image_started.pop(ev.index, time.perf_counter()))
            yield ImageOut(ev.index, image)
        elif isinstance(ev, SegmentDone):
            segments.append(ev.segment)
        elif isinstance(ev, End):
            pass

    async def _outcome(self, prepared: Prepared, ids: list[int], segments: list[Segment],
                       images: list[Image.Image], reason: str, ttft: float | None, seconds: float,
                       image_seconds: list[float]) -> Outcome:
        gen, req = prepared.input, prepared.request
        infos: list[SegmentInfo] = []
        text_parts: list[str] = []
        index = 0
        for seg in segments:
            if isinstance(seg, TextSegment):
                if seg.text.strip():
                    infos.append(SegmentInfo("text", text=seg.text))
                    text_parts.append(seg.text)
            elif isinstance(seg, GlobalCotSegment):
                infos.append(SegmentInfo("global_cot", text=seg.text))
            elif isinstance(seg, ImageCotSegment):
                infos.append(SegmentInfo("image_cot", text=seg.text))
            elif isinstance(seg, ImageSegment):
                infos.append(SegmentInfo("image", image_index=index))
                index += 1
        first_visual = self.tok.ids.first_visual
        visual = int(np.count_nonzero(np.asarray(ids, dtype=np.int64) >= first_visual)) if ids else 0
        prompt_visual = int(np.count_nonzero(np.asarray(req.cond_prompt, dtype=np.int64) >= first_visual))
        usage = Usage(len(req.cond_prompt), len(ids), visual, len(ids) - visual, prompt_visual)
        record, pngs = await asyncio.to_thread(self._record, gen, segments, images, req.request_id)
        return Outcome(req.request_id, gen.task, images, infos, "".join(text_parts), record, usage, reason,
                       ttft, seconds, image_seconds, pngs)

    @staticmethod
    def _record(gen: GenerationInput, segments: list[Segment], images: list[Image.Image],
                story_id: str) -> tuple[bytes, list[bytes]]:
        """The serialised record, and its PNGs of the generated images (in order) so that a response
        need not encode them a second time."""
        story = build_story(gen.question, list(gen.images), record_items(segments, images), story_id=story_id)
        pngs = [meta.image.image_data for clip in story.clips for seg in clip.segments for meta in seg.images]
        return story.SerializeToString(), pngs


__all__ = [
    "EngineRequestError",
    "Event",
    "Finished",
    "GenerationInput",
    "GenerationInputError",
    "GenerationRunner",
    "ImageBegin",
    "ImageOut",
    "ImageProgress",
    "Outcome",
    "Prepared",
    "SegmentInfo",
    "TextOut",
    "Usage",
]
