"""What the engines that run their own batched loop on one worker thread share (FlashAR, native).

Requests arrive on a queue; the thread owns the model and its slot caches, runs one step for every
running request per turn, and hands each request's deltas to its channel
(:mod:`service.engine.thread_channel`). This class holds everything around the loop: loading on the
right devices and dtype, the request bookkeeping, aborts noticed between turns, stats, health and
shutdown. A subclass says how to load its core (:meth:`_load`) and what one turn does (:meth:`_loop`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncGenerator, Generic, TypeVar

from service.engine.protocol import EngineError, EngineRequestError, check_fits
from service.engine.thread_channel import DeltaChannel
from service.tokenizer import Emu35Tokenizer
from service.types import EngineStats, GenerationRequest, TokenDelta

CoreT = TypeVar("CoreT")


def parse_devices(spec: str) -> list[str]:
    """``"cpu"``, ``"cuda:0"`` or a comma-separated list (``"npu:0,npu:1"``: layers split across them)."""
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise ValueError(f"no device in {spec!r}")
    return devices


@dataclass
class Submission:
    """A request handed to the worker thread, and the channel its deltas go back through."""

    req: GenerationRequest
    channel: DeltaChannel


class ThreadedEngine(Generic[CoreT]):
    """The :class:`~service.engine.protocol.AsyncEngine` API around a core that one thread drives."""

    #: the name of the worker thread and of the engine in error messages
    name = "engine"

    def __init__(self, model_dir: str | Path, tokenizer: Emu35Tokenizer, device: str, dtype: str,
                 max_model_len: int | None) -> None:
        self.model_dir, self.tokenizer = Path(model_dir), tokenizer
        self.devices = parse_devices(device)
        self.dtype = dtype
        self._max_model_len_setting = max_model_len
        self._max_model_len = 0
        self._core: CoreT | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._aborted: set[str] = set()
        self._known: set[str] = set()
        self._running: dict[str, int] = {}  # request id → cache rows it holds (cond, uncond)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._steps = 0
        self._peak = 0

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    # ---- what a subclass provides ----------------------------------------------------------------
    def _load(self, torch_dtype: Any) -> tuple[CoreT, int]:
        """The core on :attr:`devices` in ``torch_dtype``, and the model's longest context."""
        raise NotImplementedError

    def _loop(self) -> None:
        """The worker thread: turns until :attr:`_stop` is set."""
        raise NotImplementedError

    def _release(self, job: Any) -> None:
        """Give a finished or aborted job's cache slots back to the core."""
        raise NotImplementedError

    # ---- the engine API --------------------------------------------------------------------------
    def start(self) -> None:
        import torch

        if any(d.startswith("npu") for d in self.devices):
            import torch_npu  # noqa: F401  - registers the npu device type

        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if self.devices == ["cpu"] else "bfloat16"
        self._core, limit = self._load(getattr(torch, dtype))
        self._max_model_len = min(limit, self._max_model_len_setting or limit)
        self._thread = threading.Thread(target=self._loop, name=f"emu35-{self.name}", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._core = None

    async def self_check(self) -> None:
        """Nothing to prove: the loop applies the decoding rules itself."""

    async def health(self) -> bool:
        return self._core is not None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        with self._lock:
            running = len(self._running)
            rows = sum(self._running.values())
        waiting = self._inbox.qsize()
        return EngineStats(running, waiting, rows, 2 * waiting, 0.0, self._steps, 0, self._peak, rows)

    def check(self, req: GenerationRequest) -> None:
        """The checks every threaded engine makes; a subclass adds its own after calling this."""
        if self._core is None:
            raise EngineError("engine is not started")
        if req.request_id in self._known:
            raise EngineRequestError(f"request id {req.request_id!r} is already running")
        check_fits(req, self._max_model_len)

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        if self._core is None or self._thread is None:
            raise EngineError("engine is not started")
        with self._lock:
            if req.request_id in self._known:
                raise EngineRequestError(f"request id {req.request_id!r} is already running")
            self._known.add(req.request_id)
        sub = Submission(req, DeltaChannel())
        self._inbox.put(sub)
        deltas = sub.channel.deltas(f"{self.name} engine", lambda: self.abort(req.request_id))
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                yield delta

    async def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._known:
                self._aborted.add(request_id)

    # ---- helpers for the loop --------------------------------------------------------------------
    def _take_new(self, busy: bool) -> list[Submission]:
        """What arrived since the last turn; waits for something only when ``busy`` is False."""
        new: list[Submission] = []
        try:
            item = self._inbox.get(timeout=None if not busy else 0)
            while item is not None:
                new.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        return new

    def _record_turn(self, rows: dict[str, int]) -> None:
        """Count a step and which requests held how many cache rows in it (for :meth:`stats`)."""
        self._steps += 1
        with self._lock:
            self._running = rows
            self._peak = max(self._peak, sum(rows.values()))

    def _drop_aborted(self, waiting: list, active: dict) -> None:
        """End the aborted requests: ``waiting`` holds (submission, job) pairs, ``active`` maps request
        ids to them."""
        with self._lock:
            aborted = set(self._aborted)
        if not aborted:
            return
        for entry in [e for e in waiting if e[0].req.request_id in aborted]:
            waiting.remove(entry)
            self._finish(entry[0], None, abort=True)
        for rid in [r for r in active if r in aborted]:
            sub, job = active.pop(rid)
            self._release(job)
            self._finish(sub, None, abort=True)

    def _finish(self, sub: Submission, error: BaseException | None, abort: bool = False) -> None:
        with self._lock:
            self._known.discard(sub.req.request_id)
            self._aborted.discard(sub.req.request_id)
        if abort:
            sub.channel.put(TokenDelta([], "abort"))
        if error is not None:
            sub.channel.put(error)
        sub.channel.close()
