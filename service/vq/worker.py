"""The VQ worker: one thread owns the IBQ tokenizer on its device and serves encode/decode jobs.

Callers on the event loop submit jobs and await them; the loop never runs the network. The worker
takes every job waiting when it wakes up, merges jobs of the same kind (and, for encodes, the same
target area) into one call, and the tokenizer batches equal grid sizes into one forward pass.

It is fair to requests that do not ask for previews: in each round, encodes and final decodes run
before previews, and previews run one call per round, so a stream that asks for many previews waits
for them itself instead of delaying everybody's final images.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

JobKind = Literal["encode", "decode"]
#: Called after each merged call: (kind, seconds, items) — the HTTP layer turns it into metrics.
Observer = Callable[[JobKind, float, int], None]


@dataclass
class _Job:
    kind: JobKind
    items: list[Any]
    area: int | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)
    preview: bool = False


class VqWorker:
    """Owns a :class:`~service.vq.codec.VisionTokenizer`; ``encode``/``decode`` are awaitable."""

    def __init__(self, loader: Callable[[], Any], observer: Observer | None = None) -> None:
        self._loader = loader
        self._observer = observer
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.tokenizer: Any = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Start the thread and load the tokenizer in it; raise what loading raised."""
        self._thread = threading.Thread(target=self._main, name="emu35-vq", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(30)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.tokenizer is not None

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    @property
    def downsample(self) -> int:
        return int(self.tokenizer.downsample)

    # ---- jobs ------------------------------------------------------------------------------------
    async def encode(self, images: Sequence[Image.Image], area: int | None) -> list[np.ndarray]:
        """Reference images → code grids, in order."""
        return await self._submit("encode", list(images), area)

    async def decode(self, grids: Sequence[np.ndarray], preview: bool = False) -> list[Image.Image]:
        """Code grids → RGB images, in order. ``preview`` jobs yield to final images (see the module)."""
        return await self._submit("decode", list(grids), None, preview)

    async def _submit(self, kind: JobKind, items: list[Any], area: int | None, preview: bool = False) -> list[Any]:
        if not items:
            return []
        if not self.alive:
            raise RuntimeError("the VQ worker is not running")
        loop = asyncio.get_running_loop()
        job = _Job(kind, items, area, loop, loop.create_future(), preview)
        self._jobs.put(job)
        return await job.future

    # ---- the thread ------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.tokenizer = self._loader()
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            return
        finally:
            self._ready.set()
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while True:  # everything already waiting joins this round
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            # finals first; previews (all decodes) then share one call
            for group in self._groups([job for job in batch if not job.preview]):
                self._run(group)
            for group in self._groups([job for job in batch if job.preview]):
                self._run(group)
            if stop:
                return

    @staticmethod
    def _groups(batch: list[_Job]) -> list[list[_Job]]:
        groups: dict[tuple, list[_Job]] = {}
        for job in batch:
            groups.setdefault((job.kind, job.area), []).append(job)
        return list(groups.values())

    def _run(self, jobs: list[_Job]) -> None:
        kind, area = jobs[0].kind, jobs[0].area
        items = [item for job in jobs for item in job.items]
        started = time.perf_counter()
        try:
            if kind == "encode":
                results = self.tokenizer.encode(items, area=area)
            else:
                results = self.tokenizer.decode(items)
        except BaseException as exc:  # noqa: BLE001 - each caller gets the error
            logger.exception("VQ %s of %d items failed", kind, len(items))
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            return
        if self._observer is not None:
            self._observer(kind, time.perf_counter() - started, len(items))
        at = 0
        for job in jobs:
            part = results[at:at + len(job.items)]
            at += len(job.items)
            job.loop.call_soon_threadsafe(_settle, job.future, part, None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting request went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
