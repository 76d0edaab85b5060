"""The FlashAR engine behind the async engine API: one worker thread runs the batched decoding loop.

Requests arrive on a queue; each loop turn admits what fits (one prefill forward for all newcomers),
advances every running request by one diagonal (one forward for all of them, whatever their diagonals)
and hands each request's delta to its channel. Everything around the loop (loading, aborts, stats,
shutdown) is :class:`~service.engine.worker_thread.ThreadedEngine`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.engine.protocol import EngineRequestError
from service.engine.worker_thread import Submission, ThreadedEngine, parse_devices
from service.tokenizer import Emu35Tokenizer
from service.types import GenerationRequest, TokenDelta

if TYPE_CHECKING:
    from service.engine.flashar.engine import FlashARCore, Job

__all__ = ["AsyncFlashAREngine", "parse_devices"]


class AsyncFlashAREngine(ThreadedEngine["FlashARCore"]):
    """:class:`~service.engine.flashar.engine.FlashARCore` with the :class:`AsyncEngine` API."""

    name = "FlashAR"
    #: decoding schedules offered: none to choose: a FlashAR checkpoint is trained for its anti-diagonal order, which
    #: ``ar``, ``jacobi`` and ``zipar`` are not
    schedules: tuple[str, ...] = ()

    def __init__(self, model_dir: str | Path, tokenizer: Emu35Tokenizer, device: str = "cpu", dtype: str = "auto",
                 max_model_len: int | None = None, max_concurrent: int = 4) -> None:
        super().__init__(model_dir, tokenizer, device, dtype, max_model_len)
        self.max_concurrent = max_concurrent

    def _load(self, torch_dtype: Any) -> tuple[FlashARCore, int]:
        import torch

        from service.engine.flashar.checkpoint import load_flashar_weights
        from service.engine.flashar.engine import FlashARCore
        from service.engine.flashar.network import FlashARNetwork

        config, weights = load_flashar_weights(self.model_dir, dtype=torch_dtype)
        net = FlashARNetwork(config, weights, [torch.device(d) for d in self.devices], torch_dtype)
        return FlashARCore(net, slots=2 * self.max_concurrent), config.max_position_embeddings

    def _release(self, job: Job) -> None:
        assert self._core is not None
        self._core.release(job)

    def check(self, req: GenerationRequest) -> None:
        super().check(req)
        if req.target_grid is None:
            raise EngineRequestError("a FlashAR checkpoint draws one image of a fixed size: the request needs a size")
        h, w = req.target_grid
        if max(len(req.cond_prompt), len(req.uncond_prompt or [])) + 8 + h * w > self._max_model_len:
            raise EngineRequestError(f"a {h}×{w} grid does not fit the model's context of {self._max_model_len}")

    # ---- the worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        from service.engine.flashar.engine import flashar_header, flashar_uncond

        core, tok = self._core, self.tokenizer
        assert core is not None
        waiting: list[tuple[Submission, Job]] = []
        active: dict[str, tuple[Submission, Job]] = {}
        while not self._stop.is_set():
            for sub in self._take_new(busy=bool(waiting or active)):
                grid = sub.req.target_grid
                assert grid is not None, "check() refuses a request without a size"
                job = core.make_job(sub.req, flashar_header(tok, *grid), flashar_uncond(tok), tok.ids.eol, tok.ids.eoi)
                waiting.append((sub, job))
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
            self._record_turn({rid: len(job.prompts) for rid, (_, job) in active.items()})
            for out in outputs:
                sub, job = active[out.job.request_id]
                delta = TokenDelta(out.token_ids, "stop" if out.finished else None, decode_steps=1,
                                   cells=tuple(out.cells), diagonals=(job.step, job.height + job.width - 1))
                sub.channel.put(delta)
                if out.finished:
                    del active[sub.req.request_id]
                    core.release(job)
                    self._finish(sub, None)
