"""The native engine behind the async engine API: one worker thread runs the batched decoding loop.

Requests arrive on a queue; each loop turn admits what fits the free slots (first come, first served),
runs one step for every running request (one forward pass, whatever their schedules, tasks and
points) and hands each request's delta to its channel (service.engine.thread_channel). An abort is
noticed between turns.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncGenerator

from service.engine.flashar.async_engine import parse_devices
from service.engine.protocol import EngineError, EngineRequestError, check_fits
from service.engine.thread_channel import DeltaChannel
from service.tokenizer import Emu35Tokenizer
from service.types import DECODING_MODES, EngineStats, GenerationRequest, TokenDelta

if TYPE_CHECKING:
    from service.engine.native.core import Job, NativeCore


@dataclass
class _Submission:
    req: GenerationRequest
    channel: DeltaChannel


class AsyncNativeEngine:
    """:class:`~service.engine.native.core.NativeCore` with the :class:`AsyncEngine` API."""

    #: the decoding modes this engine runs (every one of :data:`service.types.DECODING_MODES`)
    schedules: tuple[str, ...] = DECODING_MODES

    def __init__(self, model_dir: str | Path, tokenizer: Emu35Tokenizer, device: str = "cpu", dtype: str = "auto",
                 max_model_len: int | None = None, max_slots: int = 8) -> None:
        self.model_dir, self.tokenizer = Path(model_dir), tokenizer
        self.devices = parse_devices(device)
        self.dtype = dtype
        self.max_slots = max(2, max_slots)
        self._max_model_len_setting = max_model_len
        self._max_model_len = 0
        self._core: NativeCore | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._aborted: set[str] = set()
        self._known: set[str] = set()
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._steps = 0
        self._peak = 0

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def start(self) -> None:
        import torch

        from service.engine.native.core import NativeCore
        from service.engine.native.network import NativeNetwork, load_emu3_weights

        if any(d.startswith("npu") for d in self.devices):
            import torch_npu  # noqa: F401  - registers the npu device type

        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if self.devices == ["cpu"] else "bfloat16"
        torch_dtype = getattr(torch, dtype)
        config, weights = load_emu3_weights(self.model_dir, torch_dtype)
        net = NativeNetwork(config, weights, [torch.device(d) for d in self.devices], torch_dtype)
        self._core = NativeCore(net, self.tokenizer, slots=self.max_slots)
        limit = net.max_positions
        self._max_model_len = min(limit, self._max_model_len_setting or limit)
        self._thread = threading.Thread(target=self._loop, name="emu35-native", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._core = None

    async def self_check(self) -> None:
        """Nothing to prove: the loop applies the policy's rules itself."""

    async def health(self) -> bool:
        return self._core is not None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        with self._lock:
            running = len(self._running)
            rows = sum(self._running.values())
        waiting = self._inbox.qsize()
        return EngineStats(running, waiting, rows, 2 * waiting, 0.0, self._steps, 0, self._peak, rows)

    def check(self, req: GenerationRequest) -> None:
        if self._core is None:
            raise EngineError("engine is not started")
        if req.request_id in self._known:
            raise EngineRequestError(f"request id {req.request_id!r} is already running")
        if req.decoding.mode not in self.schedules:
            raise EngineRequestError(f"decoding.mode {req.decoding.mode!r} is not offered (offered: {self.schedules})")
        check_fits(req, self._max_model_len)

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        if self._core is None or self._thread is None:
            raise EngineError("engine is not started")
        with self._lock:
            if req.request_id in self._known:
                raise EngineRequestError(f"request id {req.request_id!r} is already running")
            self._known.add(req.request_id)
        sub = _Submission(req, DeltaChannel())
        self._inbox.put(sub)
        deltas = sub.channel.deltas("native engine", lambda: self.abort(req.request_id))
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                yield delta

    async def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._known:
                self._aborted.add(request_id)

    # ---- the worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        core = self._core
        assert core is not None
        waiting: list[tuple[_Submission, Job]] = []
        active: dict[str, tuple[_Submission, Job]] = {}
        while not self._stop.is_set():
            try:  # block only when there is nothing to run
                item = self._inbox.get(timeout=None if not (waiting or active) else 0)
                while item is not None:
                    waiting.append((item, core.make_job(item.req)))
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            self._drop_aborted(waiting, active)
            while waiting and core.admit(waiting[0][1]):  # first come, first served
                sub, job = waiting.pop(0)
                active[sub.req.request_id] = (sub, job)
            if not active:
                continue
            entries = list(active.values())
            try:
                deltas = core.step([job for _, job in entries])
            except BaseException as exc:  # noqa: BLE001 - every request in the turn fails with it
                for sub, job in entries:
                    core.release(job)
                    self._finish(sub, exc)
                active.clear()
                continue
            self._steps += 1
            with self._lock:
                self._running = {rid: len(job.rows) for rid, (_, job) in active.items()}
                self._peak = max(self._peak, sum(self._running.values()))
            for (sub, job), delta in zip(entries, deltas):
                sub.channel.put(delta)
                if delta.finished:
                    del active[sub.req.request_id]
                    core.release(job)
                    self._finish(sub, None)

    def _drop_aborted(self, waiting: list, active: dict) -> None:
        with self._lock:
            aborted = set(self._aborted)
        if not aborted:
            return
        for entry in [e for e in waiting if e[0].req.request_id in aborted]:
            waiting.remove(entry)
            self._finish(entry[0], None, abort=True)
        for rid in [r for r in active if r in aborted]:
            sub, job = active.pop(rid)
            assert self._core is not None
            self._core.release(job)
            self._finish(sub, None, abort=True)

    def _finish(self, sub: _Submission, error: BaseException | None, abort: bool = False) -> None:
        with self._lock:
            self._known.discard(sub.req.request_id)
            self._aborted.discard(sub.req.request_id)
        if abort:
            sub.channel.put(TokenDelta([], "abort"))
        if error is not None:
            sub.channel.put(error)
        sub.channel.close()
