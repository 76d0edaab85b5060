"""The reference engine behind the async engine API, for machines without vLLM (and ``--engine reference``).

The reference engine is synchronous and runs one generation at a time, so generations queue here and
run one after another in a single worker thread; token deltas cross into the event loop through an
:class:`~service.engine.thread_channel.DeltaChannel`. An abort is a flag the worker checks between decoding steps.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, AsyncGenerator

from service.engine.protocol import EngineError, EngineRequestError, EngineStats, check_fits
from service.engine.thread_channel import DeltaChannel
from service.tokenizer import Emu35Tokenizer
from service.types import GenerationRequest, TokenDelta

if TYPE_CHECKING:
    from service.engine.reference.engine import ReferenceEngine

class AsyncReferenceEngine:
    """:class:`~service.engine.reference.ReferenceEngine` with the :class:`AsyncEngine` API."""

    #: decoding schedules offered: one token per pass, the release's own loop
    schedules: tuple[str, ...] = ("ar",)

    def __init__(self, model_dir: str | Path, tokenizer: Emu35Tokenizer, device: str = "cpu",
                 dtype: str = "auto", max_model_len: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self._max_model_len_setting = max_model_len
        self._max_model_len = 0
        self._engine: ReferenceEngine | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._aborted: set[str] = set()
        self._waiting: set[str] = set()
        self._running: str | None = None
        self._lock = threading.Lock()
        self._steps = 0

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def start(self) -> None:
        import torch

        from service.engine.reference.engine import ReferenceEngine

        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if self.device == "cpu" else "bfloat16"
        self._engine = ReferenceEngine(self.model_dir, self.tokenizer, self.device, getattr(torch, dtype))
        limit = int(self._engine.config.raw.get("max_position_embeddings", 32768))
        self._max_model_len = min(limit, self._max_model_len_setting or limit)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="emu35-reference")

    def shutdown(self) -> None:
        with self._lock:
            self._aborted |= self._waiting | ({self._running} if self._running else set())
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._engine = None

    async def self_check(self) -> None:
        """Nothing to prove: the reference engine applies the rules in its own loop."""

    async def health(self) -> bool:
        return self._engine is not None and self._pool is not None

    def stats(self) -> EngineStats:
        running = 1 if self._running else 0
        rows = 2  # a guided generation is a batch of two rows
        return EngineStats(running, len(self._waiting), running * rows, len(self._waiting) * rows, 0.0,
                           self._steps, 0, rows, (running + len(self._waiting)) * rows)

    def check(self, req: GenerationRequest) -> None:
        self._check_id(req)
        check_fits(req, self._max_model_len)

    def _check_id(self, req: GenerationRequest) -> None:
        if self._engine is None:
            raise EngineError("engine is not started")
        if req.request_id in self._waiting or req.request_id == self._running:
            raise EngineRequestError(f"request id {req.request_id!r} is already running")

    def _run(self, req: GenerationRequest, channel: DeltaChannel) -> None:
        """Worker thread: decode step by step, hand each delta to the loop, stop early on abort."""
        rid = req.request_id
        with self._lock:
            self._waiting.discard(rid)
            skip = rid in self._aborted
            if not skip:
                self._running = rid
        try:
            engine = self._engine
            if skip or engine is None:
                channel.put(TokenDelta([], "abort"))
                return
            for delta in engine.generate(req):
                self._steps += 1
                if rid in self._aborted:
                    channel.put(TokenDelta([], "abort"))
                    return
                channel.put(delta)
                if delta.finished:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            channel.put(exc)
        finally:
            with self._lock:
                self._running = None
                self._aborted.discard(rid)
            channel.close()

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        self._check_id(req)  # the rest of check() ran when the request was prepared
        if self._pool is None:
            raise EngineError("engine is not started")
        channel = DeltaChannel()
        with self._lock:
            self._waiting.add(req.request_id)
        self._pool.submit(self._run, req, channel)
        deltas = channel.deltas("reference engine", lambda: self.abort(req.request_id))
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                yield delta

    async def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._waiting or request_id == self._running:
                self._aborted.add(request_id)
