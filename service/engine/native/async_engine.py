"""The native engine behind the async engine API: one worker thread runs the batched decoding loop.

Requests arrive on a queue; each loop turn admits what fits the free slots (first come, first served),
runs one step for every running request (one forward pass, whatever their schedules, tasks and
points) and hands each request's delta to its channel. Everything around the loop (loading, aborts,
stats, shutdown) is :class:`~service.engine.worker_thread.ThreadedEngine`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.engine.protocol import EngineRequestError
from service.engine.worker_thread import Submission, ThreadedEngine
from service.tokenizer import Emu35Tokenizer
from service.types import DECODING_MODES, GenerationRequest

if TYPE_CHECKING:
    from service.engine.native.core import Job, NativeCore


class AsyncNativeEngine(ThreadedEngine["NativeCore"]):
    """:class:`~service.engine.native.core.NativeCore` with the :class:`AsyncEngine` API."""

    name = "native"
    #: the decoding modes this engine runs (every one of :data:`service.types.DECODING_MODES`)
    schedules: tuple[str, ...] = DECODING_MODES

    def __init__(self, model_dir: str | Path, tokenizer: Emu35Tokenizer, device: str = "cpu", dtype: str = "auto",
                 max_model_len: int | None = None, max_slots: int = 8) -> None:
        super().__init__(model_dir, tokenizer, device, dtype, max_model_len)
        self.max_slots = max(2, max_slots)

    def _load(self, torch_dtype: Any) -> tuple[NativeCore, int]:
        import torch

        from service.engine.native.core import NativeCore
        from service.engine.native.network import NativeNetwork, load_emu3_weights

        config, weights = load_emu3_weights(self.model_dir, torch_dtype)
        net = NativeNetwork(config, weights, [torch.device(d) for d in self.devices], torch_dtype)
        return NativeCore(net, self.tokenizer, slots=self.max_slots), net.max_positions

    def _release(self, job: Job) -> None:
        assert self._core is not None
        self._core.release(job)

    def check(self, req: GenerationRequest) -> None:
        super().check(req)
        if req.decoding.mode not in self.schedules:
            raise EngineRequestError(f"decoding.mode {req.decoding.mode!r} is not offered (offered: {self.schedules})")

    # ---- the worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        core = self._core
        assert core is not None
        waiting: list[tuple[Submission, Job]] = []
        active: dict[str, tuple[Submission, Job]] = {}
        while not self._stop.is_set():
            waiting += [(sub, core.make_job(sub.req)) for sub in self._take_new(busy=bool(waiting or active))]
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
            self._record_turn({rid: len(job.rows) for rid, (_, job) in active.items()})
            for (sub, job), delta in zip(entries, deltas):
                sub.channel.put(delta)
                if delta.finished:
                    del active[sub.req.request_id]
                    core.release(job)
                    self._finish(sub, None)
