"""Drive a batch through one engine: every prompt concurrently, up to the engine's slots.

``max_concurrent`` workers share one queue, so the moment a prompt finishes its slot takes the next
one (no waiting for a wave to end). A prompt that fails is recorded with its name, the field at fault
and the reason, and the others go on; a record is written only for a prompt that finished. Cancelling
the batch (a signal) closes each running generation, which aborts its engine pair, and writes nothing
for it, so the next run starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Literal, Sequence

from PIL import Image

from service.batch.items import Item, ItemError
from service.batch.progress import Progress
from service.batch.records import is_written, write_record
from service.task import (
    EngineError,
    Finished,
    GenerationInput,
    GenerationRunner,
    Outcome,
    PlanError,
    build_engine,
    engine_name,
    load_tokenizer,
    model_kind,
    start_vq_worker,
)
from service.task.resources import ResourceSettings

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class PromptResult:
    """What became of one prompt (one entry of the JSON summary)."""

    name: str
    status: Status
    seconds: float = 0.0
    tokens: int = 0  # generated tokens (text and image)
    finish_reason: str | None = None
    field: str | None = None  # the input field at fault, for a failure
    reason: str | None = None


@dataclass
class BatchSummary:
    results: dict[str, PromptResult] = field(default_factory=dict)
    seconds: float = 0.0

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results.values() if r.status == status)

    @property
    def failed(self) -> list[PromptResult]:
        return [r for r in self.results.values() if r.status == "failed"]

    def mark_not_run(self, items: Sequence[Item], reason: str) -> None:
        """Record the prompts of ``items`` that have no result yet (a run cut short) as failed."""
        for item in items:
            self.results.setdefault(item.name, PromptResult(item.name, "failed", reason=reason))

    def to_json(self) -> str:
        return json.dumps({
            "generated": self.count("ok"), "skipped": self.count("skipped"), "failed": self.count("failed"),
            "seconds": round(self.seconds, 3),
            "prompts": {name: {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(r).items()
                               if k != "name" and v is not None}
                        for name, r in self.results.items()},
        }, indent=2, ensure_ascii=False)


class PromptFailed(Exception):
    """One prompt cannot be run; ``field`` names the input field at fault."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _read_images(item: Item) -> tuple[Image.Image, ...]:
    images = []
    for path in item.image_paths:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise PromptFailed(item.images_field, f"cannot read reference image {str(path)!r}: {exc}") from None
    return tuple(images)


async def generate_one(runner: GenerationRunner, item: Item) -> Outcome:
    """Plan, run and finish one prompt; raise :class:`PromptFailed` with the reason."""
    images = await asyncio.to_thread(_read_images, item)
    gen = GenerationInput(item.task, item.question, images, item.options)
    try:
        prepared = await runner.prepare(gen, f"batch-{uuid.uuid4().hex}")
    except PlanError as exc:
        field_name = item.images_field if exc.param == "images" else exc.param or "prompt"
        raise PromptFailed(field_name, str(exc)) from None
    outcome: Outcome | None = None
    events = runner.run(prepared)
    try:
        async for ev in events:
            if isinstance(ev, Finished):
                outcome = ev.outcome
    finally:
        await events.aclose()
    if outcome is None or outcome.finish_reason == "abort":
        raise PromptFailed(None, "the engine aborted the generation")
    return outcome


async def _worker(runner: GenerationRunner, queue: asyncio.Queue[Item], out_dir: Path, summary: BatchSummary,
                  progress: Progress) -> None:
    while True:
        try:
            item = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        started = time.perf_counter()
        try:
            outcome = await generate_one(runner, item)
            await asyncio.to_thread(write_record, out_dir, item.name, outcome.record)
        except PromptFailed as exc:
            result = PromptResult(item.name, "failed", time.perf_counter() - started, field=exc.field,
                                  reason=exc.reason)
        except (EngineError, OSError) as exc:
            result = PromptResult(item.name, "failed", time.perf_counter() - started,
                                  reason=f"{type(exc).__name__}: {exc}")
        else:
            result = PromptResult(item.name, "ok", outcome.seconds, outcome.usage.completion_tokens,
                                  outcome.finish_reason)
        summary.results[item.name] = result
        progress.done(item.name, result.status, _detail(result))


def _detail(result: PromptResult) -> str:
    if result.status == "failed":
        return f"{result.field}: {result.reason}" if result.field else str(result.reason)
    return f"{result.seconds:.1f} s, {result.tokens} tokens"


def plan_batch(entries: Sequence[Item | ItemError], out_dir: Path) -> tuple[list[Item], BatchSummary]:
    """The prompts to generate, and a summary holding the ones refused by the input and the ones
    already written (skipped, as the release does)."""
    summary = BatchSummary()
    todo: list[Item] = []
    for entry in entries:
        if isinstance(entry, ItemError):
            summary.results[entry.name] = PromptResult(entry.name, "failed", field=entry.field, reason=entry.reason)
        elif is_written(out_dir, entry.name):
            summary.results[entry.name] = PromptResult(entry.name, "skipped")
        else:
            todo.append(entry)
    return todo, summary


async def run_batch(runner: GenerationRunner, todo: Sequence[Item], out_dir: Path, summary: BatchSummary,
                    max_concurrent: int, progress: Progress) -> BatchSummary:
    """Generate ``todo`` into ``out_dir`` with ``max_concurrent`` prompts in flight; fills ``summary``."""
    started = time.perf_counter()
    queue: asyncio.Queue[Item] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    workers = [asyncio.create_task(_worker(runner, queue, out_dir, summary, progress))
               for _ in range(max(1, min(max_concurrent, len(todo))))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        summary.seconds = time.perf_counter() - started
    return summary


@contextlib.asynccontextmanager
async def started_runner(settings: ResourceSettings, image_area: int | None = None) -> AsyncIterator[GenerationRunner]:
    """The tokenizer, the VQ worker and the engine of ``settings``, started (as the server's runtime
    starts them) for as long as the block runs; ``image_area`` is the service-wide default."""
    tokenizer = await asyncio.to_thread(load_tokenizer, settings)
    vq = start_vq_worker(settings)
    await asyncio.to_thread(vq.start)
    engine = build_engine(settings, tokenizer)
    try:
        await asyncio.to_thread(engine.start)
        await engine.self_check()
        yield GenerationRunner(engine, vq, tokenizer, image_area=image_area, kind=model_kind(settings),
                               decoding=settings.default_decoding, engine_name=engine_name(settings))
    finally:
        try:
            engine.shutdown()
        finally:
            vq.stop()
