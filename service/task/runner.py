"""The task layer's generation, as a stream of events the HTTP layer forwards.

``GenerationRunner.prepare`` plans a request (defaults resolved once, limits checked once), encodes the
reference images on the VQ worker and asks the engine whether it can run it, so a bad request fails
before any response starts. ``GenerationRunner.run`` drives the engine, feeds the ids to the stream
parser and yields :mod:`service.task.events`: text deltas per channel, image start / row progress (with
optional decoded previews) / finished image, and finally :class:`Finished`. Each parsed segment is
mapped once, to its answer part and its record item together. Closing the iterator early (a client
went away) aborts the engine's pair.

No HTTP here and no tensors leave it: images are PIL images, the record is bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import AsyncGenerator, AsyncIterator, Protocol, Sequence

import numpy as np
from PIL import Image

from service.engine.protocol import AsyncEngine
from service.prompts import Task
from service.record import RecordGlobalCot, RecordImage, RecordImageCot, RecordItem, RecordText, build_story
from service.record.builder import encode_png
from service.task.events import (
    AnswerPart,
    Finished,
    ImageProgress,
    ImageReady,
    ImageStart,
    Outcome,
    RunEvent,
    TextOut,
    Usage,
)
from service.task.planner import (
    GenerationOptions,
    PlanError,
    build_request,
    check_reference_count,
    check_reference_tokens,
    resolve,
    resolve_decoding,
)
from service.task.previews import PreviewSchedule
from service.token_layout import (
    GlobalCotSegment,
    ImageCotSegment,
    ImageDone,
    ImageRows,
    ImageSegment,
    ImageStarted,
    SegmentDone,
    StreamParser,
    TextDelta,
    TextSegment,
)
from service.tokenizer import Emu35Tokenizer
from service.types import Decoding, GenerationRequest, ModelKind

#: The size a FlashAR checkpoint draws when the client names none: its trained grid, 32×32 tokens.
FLASHAR_DEFAULT_SIZE = "512x512"

#: zlib level of the one PNG each generated image gets: the images are the product, and a response
#: waits for the encoder, so speed wins over a few per cent of size.
PNG_COMPRESS_LEVEL = 1


class ImageCodecAsync(Protocol):
    """The VQ worker's interface (see ``service.vq.worker``)."""

    @property
    def downsample(self) -> int: ...

    async def encode(self, images: Sequence[Image.Image], area: int | None) -> list[np.ndarray]: ...

    async def decode(self, grids: Sequence[np.ndarray], preview: bool = False) -> list[Image.Image]: ...



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


@dataclass
class AnswerBuilder:
    """The answer and its record, built in one pass over the parsed segments: each segment becomes its
    answer part and its record item together (whitespace-only text becomes neither)."""

    parts: list[AnswerPart] = field(default_factory=list)
    record_items: list[RecordItem] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    pngs: list[bytes] = field(default_factory=list)

    def add_image(self, image: Image.Image, png: bytes) -> None:
        """A decoded image (before its segment arrives: the parser reports the image first)."""
        self.images.append(image)
        self.pngs.append(png)

    def add_segment(self, segment: object) -> None:
        if isinstance(segment, TextSegment):
            if segment.text.strip():
                self.parts.append(AnswerPart("text", text=segment.text))
                self.record_items.append(RecordText(segment.text))
                self.text.append(segment.text)
        elif isinstance(segment, GlobalCotSegment):
            self.parts.append(AnswerPart("global_cot", text=segment.text))
            self.record_items.append(RecordGlobalCot(segment.text))
        elif isinstance(segment, ImageCotSegment):
            self.parts.append(AnswerPart("image_cot", text=segment.text))
            self.record_items.append(RecordImageCot(segment.text))
        elif isinstance(segment, ImageSegment):
            index = sum(1 for p in self.parts if p.type == "image")
            self.parts.append(AnswerPart("image", image_index=index))
            self.record_items.append(RecordImage(self.images[index], self.pngs[index]))


@dataclass
class _Run:
    """Everything one running generation accumulates, in one place."""

    prepared: Prepared
    previews: PreviewSchedule | None
    downsample: int
    started: float = field(default_factory=time.perf_counter)
    ids: list[int] = field(default_factory=list)
    answer: AnswerBuilder = field(default_factory=AnswerBuilder)
    image_seconds: list[float] = field(default_factory=list)
    image_started: dict[int, float] = field(default_factory=dict)
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    rows: dict[int, list[np.ndarray]] = field(default_factory=dict)  # kept only while a preview is due
    preview_rows: dict[int, tuple[int, ...]] = field(default_factory=dict)
    ttft: float | None = None
    reason: str = "abort"
    decode_steps: int = 0
    canvas: np.ndarray | None = None  # FlashAR: the ids drawn so far of the current image (−1: not yet)


class GenerationRunner:
    """Runs generations on one engine and one VQ worker."""

    def __init__(self, engine: AsyncEngine, vq: ImageCodecAsync, tokenizer: Emu35Tokenizer,
                 image_area: int | None = None, kind: ModelKind = "emu3.5", decoding: Decoding | None = None,
                 engine_name: str = "serving") -> None:
        self.engine = engine
        self.vq = vq
        self.tok = tokenizer
        self.image_area = image_area  # a service-wide override of every task's default image area
        self.kind = kind  # a FlashAR checkpoint draws T2I only, by default at its trained grid
        self.decoding = decoding  # the server's default schedule (None: the engine's first, ar)
        self.engine_name = engine_name  # named in the 400 of a schedule the engine lacks
        #: what the engine offers; an engine that does not say draws one token per pass
        self.schedules: tuple[str, ...] = tuple(getattr(engine, "schedules", ("ar",)))

    def _flashar_input(self, gen: GenerationInput) -> GenerationInput:
        """What a FlashAR checkpoint can do, checked before any work: text to one image, no reference
        images; the default size is the trained 32×32 grid."""
        if gen.task is not Task.T2I or gen.images:
            what = "reference images" if gen.images else f"the {gen.task.value} task"
            raise PlanError(f"this service runs a FlashAR checkpoint, which draws text-to-image only: {what} "
                            f"cannot be served", "images" if gen.images else "task")
        if gen.options.size is None or gen.options.size.strip() == "auto":
            return replace(gen, options=replace(gen.options, size=FLASHAR_DEFAULT_SIZE, fit_size_to_area=False))
        return gen

    async def prepare(self, gen: GenerationInput, request_id: str) -> Prepared:
        """Plan, encode the reference images and check the engine can run it; raise :class:`PlanError`."""
        if self.kind == "flashar":
            gen = self._flashar_input(gen)
        check_reference_count(len(gen.images))
        decoding = resolve_decoding(gen.options.decoding, self.decoding, self.schedules, self.engine_name)
        plan = replace(resolve(gen.task, gen.options, self.image_area), decoding=decoding)
        check_reference_tokens([im.size for im in gen.images], plan, self.vq.downsample, self.engine.max_model_len)
        grids = await self.vq.encode(list(gen.images), plan.image_area) if gen.images else []
        req = build_request(self.tok, plan, gen.question, grids, request_id, max_model_len=self.engine.max_model_len)
        try:
            self.engine.check(req)
        except ValueError as exc:  # EngineRequestError
            raise PlanError(str(exc)) from exc
        return Prepared(gen, req)

    # ---- running ------------------------------------------------------------------------------
    async def run(self, prepared: Prepared,
                  previews: PreviewSchedule | None = None) -> AsyncGenerator[RunEvent, None]:
        """Drive one generation; the last event is :class:`Finished`. Closing early aborts it.

        ``previews`` names the rows at which an image's rows so far are decoded into a preview."""
        run = _Run(prepared, previews, self.vq.downsample)
        parser = StreamParser(self.tok)
        stream = self.engine.generate(prepared.request)
        try:
            async for delta in stream:
                if delta.token_ids and run.ttft is None:
                    run.ttft = time.perf_counter() - run.started
                run.ids += delta.token_ids
                run.decode_steps += delta.steps
                events = parser.feed(delta.token_ids) if delta.token_ids else []
                if delta.finished:
                    run.reason = delta.finish_reason or "abort"
                    if not parser.ended:
                        events += parser.finish()
                # a diagonal's progress goes after its image's start and before its finished image
                late = delta.diagonals is not None and not run.grids
                if delta.diagonals is not None and not late:
                    async for progress in self._diagonal_progress(run, delta.cells, delta.diagonals):
                        yield progress
                for ev in events:
                    async for out in self._on_parsed(run, ev):
                        yield out
                if late:
                    async for progress in self._diagonal_progress(run, delta.cells, delta.diagonals):
                        yield progress
                if delta.finished:
                    break
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
        yield Finished(await self._outcome(run))

    async def _on_parsed(self, run: _Run, ev: object) -> AsyncIterator[RunEvent]:
        """One parser event → zero or more run events (decoding images on the VQ worker)."""
        f = run.downsample
        if isinstance(ev, TextDelta):
            if ev.text:
                yield TextOut(ev.channel, ev.text)
        elif isinstance(ev, ImageStarted):
            run.image_started[ev.index] = time.perf_counter()
            run.grids[ev.index] = (ev.height, ev.width)
            run.rows[ev.index] = []
            run.preview_rows[ev.index] = run.previews.rows(ev.height) if run.previews else ()
            yield ImageStart(ev.index, ev.width * f, ev.height * f)
        elif isinstance(ev, ImageRows):
            if self.kind == "flashar":  # progress comes per diagonal (see _diagonal_progress)
                return
            async for progress in self._progress(run, ev):
                yield progress
        elif isinstance(ev, ImageDone):
            (image,) = await self.vq.decode([np.asarray(ev.codes)])
            png = await asyncio.to_thread(encode_png, image, PNG_COMPRESS_LEVEL)
            run.answer.add_image(image, png)
            run.rows.pop(ev.index, None)
            run.preview_rows.pop(ev.index, None)
            run.image_seconds.append(time.perf_counter() - run.image_started.pop(ev.index, time.perf_counter()))
            yield ImageReady(ev.index, image, png)
        elif isinstance(ev, SegmentDone):
            run.answer.add_segment(ev.segment)

    async def _progress(self, run: _Run, ev: ImageRows) -> AsyncIterator[ImageProgress]:
        """Rows done → progress, with a preview at each scheduled row these rows passed (decoded from
        exactly the rows up to it, all in one VQ call, whatever the engine's chunking)."""
        total = run.grids[ev.index][0]
        scheduled = run.preview_rows.get(ev.index, ())
        before = ev.rows_done - len(ev.new_rows)
        if scheduled and before < scheduled[-1]:
            run.rows[ev.index].append(np.asarray(ev.new_rows))
        due = [r for r in scheduled if before < r <= ev.rows_done]
        if due:
            done = np.concatenate(run.rows[ev.index], axis=0)
            previews = await self.vq.decode([done[:r] for r in due], preview=True)
            for r, preview in zip(due, previews):
                yield ImageProgress(ev.index, r, total, preview)
        if not due or due[-1] != ev.rows_done:
            yield ImageProgress(ev.index, ev.rows_done, total, None)

    async def _diagonal_progress(self, run: _Run, cells: tuple[tuple[int, int], ...],
                                 diagonals: tuple[int, int] | None) -> AsyncIterator[ImageProgress]:
        """FlashAR's progress, one event per diagonal drawn: the image fills in from its top-left corner.
        A preview (at the diagonals the schedule names) decodes the grid with the cells not drawn yet
        set to code 0, then greys them out, so it shows exactly what is drawn."""
        if not run.grids or diagonals is None:
            return
        index = max(run.grids)
        height, width = run.grids[index]
        if run.canvas is None or run.canvas.shape != (height, width):
            run.canvas = np.full((height, width), -1, dtype=np.int64)
        flat = run.canvas.reshape(-1)
        for q, token in cells:
            flat[q] = token - self.tok.ids.first_visual
        done, total = diagonals
        if done >= total:  # the finished image follows at once
            return
        preview = None
        if run.previews is not None and done in run.previews.rows(total):
            drawn = run.canvas >= 0
            (image,) = await self.vq.decode([np.where(drawn, run.canvas, 0)], preview=True)
            preview = _grey_out(image, drawn, run.downsample)
        rows = int(drawn_rows(run.canvas))
        yield ImageProgress(index, rows, height, preview, done, total)

    async def _outcome(self, run: _Run) -> Outcome:
        gen, req = run.prepared.input, run.prepared.request
        first_visual = self.tok.ids.first_visual
        ids = np.asarray(run.ids, dtype=np.int64)
        visual = int(np.count_nonzero(ids >= first_visual))
        prompt_visual = int(np.count_nonzero(np.asarray(req.cond_prompt, dtype=np.int64) >= first_visual))
        usage = Usage(len(req.cond_prompt), len(ids), visual, len(ids) - visual, prompt_visual)
        answer = run.answer
        story = await asyncio.to_thread(build_story, gen.question, list(gen.images), answer.record_items,
                                        req.request_id)
        return Outcome(req.request_id, gen.task, answer.images, answer.pngs, answer.parts, "".join(answer.text),
                       story.SerializeToString(), usage, run.reason, run.ttft, time.perf_counter() - run.started,
                       run.image_seconds, run.decode_steps, req.decoding.resolved() if self.schedules else None)


#: Grey of the cells a partial image has not drawn yet (the VQ's zero point, as the OpenAI partials use).
BLANK = 127


def drawn_rows(canvas: np.ndarray) -> int:
    """Complete rows at the top of ``canvas`` (−1 marks a cell not drawn yet)."""
    complete = (canvas >= 0).all(axis=1)
    return int(complete.argmin()) if not complete.all() else canvas.shape[0]


def _grey_out(image: Image.Image, drawn: np.ndarray, downsample: int) -> Image.Image:
    """``image`` with the pixels of undrawn cells set to :data:`BLANK`."""
    pixels = np.asarray(image.convert("RGB")).copy()
    mask = np.repeat(np.repeat(~drawn, downsample, axis=0), downsample, axis=1)
    pixels[mask[: pixels.shape[0], : pixels.shape[1]]] = BLANK
    return Image.fromarray(pixels)
