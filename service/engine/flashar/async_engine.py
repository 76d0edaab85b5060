"""The FlashAR engine behind the async engine API: one worker thread runs the batched decoding loop.

Requests arrive on a queue; each loop turn admits what fits (one prefill forward for all newcomers),
advances every running request by one diagonal (one forward for all of them, whatever their diagonals)
and hands each request's delta to its channel (service.engine.thread_channel). An abort is noticed between turns.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncGenerator

from service.engine.protocol import EngineError, EngineRequestError, check_fits
from service.engine.thread_channel import DeltaChannel
from service.tokenizer import Emu35Tokenizer
from service.types import EngineStats, GenerationRequest, TokenDelta

if TYPE_CHECKING:
    from service.engine.flashar.engine import FlashARCore, Job


def parse_devices(spec: str) -> list[str]:
    """``"cpu"``, ``"cuda:0"`` or a comma-separated list (``"npu:0,npu:1"``: layers split across them)."""
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise ValueError(f"no device in {spec!r}")
    return devices


@dataclass
class _Submission:
    req: GenerationRequest
    channel: DeltaChannel


class AsyncFlashAREngine:
    """:class:`~service.engine.flashar.engine.FlashARCore` with the :class:`AsyncEngine` API."""

    #: decoding schedules offered: none to choose: a FlashAR checkpoint is trained for its anti-diagonal order, which
    #: ``ar``, ``jacobi`` and ``zipar`` are not
    schedules: tuple[str, ...] = ()

    def __init__(self, model_dir: str | Path, tokenizer: Emu35Tokenizer, device: str = "cpu", dtype: str = "auto",
                 max_model_len: int | None = None, max_concurrent: int = 4) -> None:
        self.model_dir, self.tokenizer = Path(model_dir), tokenizer
        self.devices = parse_devices(device)
        self.dtype = dtype
        self.max_concurrent = max_concurrent
        self._max_model_len_setting = max_model_len
        self._max_model_len = 0
        self._core: FlashARCore | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._aborted: set[str] = set()
        self._known: set[str] = set()
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._failed: BaseException | None = None
        self._steps = 0
        self._peak = 0

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def start(self) -> None:
        import torch

        from service.engine.flashar.checkpoint import load_flashar_weights
        from service.engine.flashar.engine import FlashARCore
        from service.engine.flashar.network import FlashARNetwork

        if any(d.startswith("npu") for d in self.devices):
            import torch_npu  # noqa: F401  - registers the npu device type

        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if self.devices == ["cpu"] else "bfloat16"
        torch_dtype = getattr(torch, dtype)
        config, weights = load_flashar_weights(self.model_dir, dtype=torch_dtype)
        net = FlashARNetwork(config, weights, [torch.device(d) for d in self.devices], torch_dtype)
        self._core = FlashARCore(net, slots=2 * self.max_concurrent)
        limit = config.max_position_embeddings
        self._max_model_len = min(limit, self._max_model_len_setting or limit)
        self._thread = threading.Thread(target=self._loop, name="emu35-flashar", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._core = None

    async def self_check(self) -> None:
        """Nothing to prove: the FlashAR loop applies its vocabulary and layout rules itself."""

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
        if req.target_grid is None:
            raise EngineRequestError("a FlashAR checkpoint draws one image of a fixed size: the request needs a size")
        check_fits(req, self._max_model_len)
        h, w = req.target_grid
        if max(len(req.cond_prompt), len(req.uncond_prompt or [])) + 8 + h * w > self._max_model_len:
            raise EngineRequestError(f"a {h}×{w} grid does not fit the model's context of {self._max_model_len}")

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        if self._core is None or self._thread is None:
            raise EngineError("engine is not started")
        with self._lock:
            if req.request_id in self._known:
                raise EngineRequestError(f"request id {req.request_id!r} is already running")
            self._known.add(req.request_id)
        sub = _Submission(req, DeltaChannel())
        self._inbox.put(sub)
        deltas = sub.channel.deltas("FlashAR engine", lambda: self.abort(req.request_id))
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                yield delta

    async def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._known:
                self._aborted.add(request_id)

    # ---- the worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        from service.engine.flashar.engine import flashar_header, flashar_uncond

        core, tok = self._core, self.tokenizer
        assert core is not None
        waiting: list[tuple[_Submission, Job]] = []
        active: dict[str, tuple[_Submission, Job]] = {}
        while not self._stop.is_set():
            try:  # block only when there is nothing to run
                item = self._inbox.get(timeout=None if not (waiting or active) else 0)
                while item is not None:
                    grid = item.req.target_grid
                    job = core.make_job(item.req, flashar_header(tok, *grid), flashar_uncond(tok),
                                        tok.ids.eol, tok.ids.eoi)
                    waiting.append((item, job))
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            self._drop_aborted(waiting, active)
            joining = waiting[:len(core.admissible([job for _, job in waiting]))]  # first come, first served
            del waiting[:len(joining)]
            try:
                outputs = core.advance([j for _, j in active.values()]) if active else []
                outputs += core.admit([j for _, j in joining]) if joining else []
            except BaseException as exc:  # noqa: BLE001 - every request in the turn fails with it
                for sub, job in [*active.values(), *joining]:
                    self._finish(sub, exc)
                    core.release(job)
                active.clear()
                continue
            for sub, job in joining:
                active[sub.req.request_id] = (sub, job)
            self._steps += 1
            with self._lock:
                self._running = {rid: len(job.prompts) for rid, (_, job) in active.items()}
                self._peak = max(self._peak, sum(self._running.values()))
            for out in outputs:
                sub, job = active[out.job.request_id]
                delta = TokenDelta(out.token_ids, "stop" if out.finished else None, decode_steps=1,
                                   cells=tuple(out.cells), diagonals=(job.step, job.height + job.width - 1))
                sub.channel.put(delta)
                if out.finished:
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
