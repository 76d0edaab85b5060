"""The persistent vLLM engine the service holds: Emu3.5 generations as cond/uncond request pairs.

One ``AsyncLLM`` (tensor parallel) runs every generation. A guided generation is submitted as two vLLM
requests that carry their Emu3.5 settings in ``SamplingParams.extra_args``; the pair-aware scheduler
admits them together and the logits processor applies design.md §5 to the whole batch, samples, and forces
the cond row's token into the uncond row. vLLM itself runs greedy over the processor's one-hot rows.
In the ``reference`` uncond mode the cond request starts alone, and each image header it writes starts
that image's uncond request (uncond prompt + image spans so far), which runs to the image's EOI.

The engine yields :class:`TokenDelta` for the cond sequence only; the uncond sequence is drained in the
background (:meth:`VllmEngine._drain` returns its ids; the tests' subclass keeps them to prove lockstep).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator

from service.engine.config import VllmEngineConfig
from service.engine.policy.admission import blocks_for
from service.engine.policy.pairing import UNCOND_SUFFIX, RowSpec, image_uncond, row_specs
from service.engine.policy.spans import FREE_HEADER_LEN, ImageSpans, SpanTokens
from service.engine.protocol import (
    EngineError,
    EngineRequestError,
    EngineStats,
    EngineUnavailableError,
    PairBrokenError,
    check_fits,
)
from service.tokenizer import Emu35Tokenizer
from service.types import GenerationRequest, TokenDelta

__all__ = ["VllmEngine", "EngineError", "EngineRequestError", "EngineStats", "PairBrokenError"]

logger = logging.getLogger(__name__)


def build_engine_args(config: VllmEngineConfig, *, on_cpu: bool | None = None) -> Any:
    """vLLM's ``AsyncEngineArgs`` for ``config``: the one path the engine and the tests build them by.

    vLLM turns the ``compilation_config`` dict into its ``CompilationConfig`` here, so a graph mode it
    lacks fails now, not on an accelerator. vLLM 0.11 silently drops compilation keys it does not know
    (0.32 refuses them), so they are checked here against this vLLM's fields. ``on_cpu`` defaults to
    the platform vLLM detected."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    if on_cpu is None:
        from vllm.platforms import current_platform

        on_cpu = bool(current_platform.is_cpu())
    kwargs = config.engine_args(on_cpu=on_cpu)
    _check_compilation_keys(kwargs.get("compilation_config"))
    return AsyncEngineArgs(**kwargs)


def _check_compilation_keys(compilation: Any) -> None:
    if not isinstance(compilation, dict):
        return
    import dataclasses

    import vllm
    from vllm.config import CompilationConfig

    unknown = sorted(set(compilation) - {f.name for f in dataclasses.fields(CompilationConfig)})
    if unknown:
        raise ValueError(f"compilation_config keys {unknown} are not settings of vLLM {vllm.__version__}'s "
                         "CompilationConfig")


@dataclass
class UncondPrefill:
    """What the uncond requests cost in prefill: in the reference uncond mode each image starts one, whose
    prompt (uncond prompt + image spans so far) is mostly served from the prefix cache."""

    requests: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0  # prompt tokens not found in the prefix cache


class _StatsSink:
    """Latest vLLM scheduler statistics, filled by a stat logger vLLM calls after each step."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.steps = 0
        self.preempted = 0
        self.peak_running = 0

    def logger_factory(self):
        sink = self
        from vllm.v1.metrics.loggers import StatLoggerBase

        class _Emu35StatLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                if scheduler_stats is not None:  # 0.11 passes engine_idx positionally, 0.32 by keyword
                    sink.running = int(scheduler_stats.num_running_reqs)
                    sink.waiting = int(scheduler_stats.num_waiting_reqs)
                    sink.kv_usage = float(scheduler_stats.kv_cache_usage)
                    sink.steps += 1
                    sink.peak_running = max(sink.peak_running, sink.running)
                if iteration_stats is not None:
                    sink.preempted += int(getattr(iteration_stats, "num_preempted_reqs", 0))

            def log_engine_initialized(self) -> None:
                pass

        return _Emu35StatLogger


class VllmEngine:
    """Async Emu3.5 engine over vLLM's ``AsyncLLM``. Call :meth:`start` before use, :meth:`shutdown` after."""

    #: decoding schedules offered: one token per pass: stock vLLM has no hook for drafts verified in one pass or for
    #: positions out of raster order
    schedules: tuple[str, ...] = ("ar",)

    def __init__(self, config: VllmEngineConfig, tokenizer: Emu35Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer  # the service's own: PAD (a failed pair) and the self-check's ids
        self._llm: Any = None
        self._stats = _StatsSink()
        self._inflight: dict[str, bool] = {}  # request id -> has produced a token (running) or not (waiting)
        self._unconds: dict[str, list[str]] = {}  # request id -> its uncond requests' ids so far
        self._span_ids = SpanTokens.from_tokenizer(tokenizer)
        self.uncond_prefill = UncondPrefill()
        self._max_model_len = 0
        self.kv_blocks = 0
        self.block_size = 0
        self.step_tokens = 0  # max_num_batched_tokens: prompts the pair scheduler can prefill in one step

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Build the engine (loads the model, sizes the KV cache, starts vLLM's processes)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        from service.engine.in_vllm.plugin import register

        register()  # this process too (the entry point covers vLLM's own processes)
        args = build_engine_args(self.config)
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._stats.logger_factory()])
        vcfg = self._llm.vllm_config
        # read back from the final config: platforms (vllm-ascend) may change the block size
        self._max_model_len = int(vcfg.model_config.max_model_len)
        self.kv_blocks = int(vcfg.cache_config.num_gpu_blocks or 0)
        self.block_size = int(vcfg.cache_config.block_size)
        self.step_tokens = int(vcfg.scheduler_config.max_num_batched_tokens)
        logger.info("emu35 engine ready: max_model_len=%d kv_blocks=%d block_size=%d max_pairs=%d",
                    self._max_model_len, self.kv_blocks, self.block_size, self.config.max_pairs)

    async def self_check(self) -> None:
        """Refuse to serve unless vLLM really runs the pair scheduler and the logits processor
        (``vllm_self_check``); run on the serving loop, where vLLM's output handler will live."""
        from service.engine.vllm_self_check import run_self_check

        if self._llm is None:
            raise EngineError("engine is not started")
        ids = self.tokenizer.ids
        await run_self_check(self._llm, admitted=ids.boi, other=ids.eoi, prompt=[ids.bos])
        logger.info("emu35 engine self-check passed: pair scheduler and logits processor are active")

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def dead(self) -> bool:
        """vLLM has given up on its engine core (a process died): it will not run anything again."""
        return self._llm is not None and bool(getattr(self._llm, "errored", False))

    async def health(self) -> bool:
        """True when the engine core answers (raises nothing)."""
        if self._llm is None:
            return False
        try:
            await self._llm.check_health()
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            return False
        return not self.dead

    def stats(self) -> EngineStats:
        running = sum(1 for started in self._inflight.values() if started)
        unfinished = 0
        if self._llm is not None:
            with contextlib.suppress(Exception):
                unfinished = int(self._llm.output_processor.get_num_unfinished_requests())
        return EngineStats(running, len(self._inflight) - running, self._stats.running, self._stats.waiting,
                           self._stats.kv_usage, self._stats.steps, self._stats.preempted,
                           self._stats.peak_running, unfinished)

    # ---- requests -------------------------------------------------------------------------------
    def check(self, req: GenerationRequest) -> None:
        """Raise :class:`EngineRequestError` when the request can never run on this engine."""
        self._check_id(req)
        prompts = check_fits(req, self._max_model_len)
        if self.kv_blocks and self.block_size:
            need = sum(blocks_for(len(p) + req.max_new_tokens, self.block_size) for p in prompts)
            if need > self.kv_blocks - 1:
                raise EngineRequestError(
                    f"the generation needs {need} KV blocks at full length; the engine has {self.kv_blocks - 1}")
        if self.step_tokens:
            step = self._first_step_tokens(req, prompts)
            if step > self.step_tokens:
                raise EngineRequestError(
                    f"the generation's prompts need {step} tokens in one engine step; the engine's step budget "
                    f"(max_num_batched_tokens) is {self.step_tokens}: shorten the prompt or start the service "
                    "with a larger --max-model-len")

    def _first_step_tokens(self, req: GenerationRequest, prompts: list[list[int]]) -> int:
        """Prompt tokens the pair scheduler must prefill in one step: both prompts of a lockstep pair; in
        reference mode the larger of the cond prompt and an image uncond's uncached part (the uncond
        prompt and a header the first time; later images find the earlier ones in the prefix cache)."""
        if not req.image_only_uncond:
            return sum(len(p) for p in prompts)
        return max(len(req.cond_prompt), len(req.uncond_prompt or []) + FREE_HEADER_LEN + 1 + self.block_size)

    def _check_id(self, req: GenerationRequest) -> None:
        if self._llm is None:
            raise EngineError("engine is not started")
        if req.request_id in self._inflight:
            raise EngineRequestError(f"request id {req.request_id!r} is already running")
        if UNCOND_SUFFIX in req.request_id:
            raise EngineRequestError(f"request id must not contain {UNCOND_SUFFIX!r}")

    def _sampling_params(self, req: GenerationRequest, extra: dict, cond: bool, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        stops = sorted(set(req.stop_token_ids) | {self.tokenizer.ids.pad})  # PAD = a failed pair
        return SamplingParams(
            temperature=0.0,  # the processor samples; vLLM takes the only finite logit
            max_tokens=max_tokens,
            ignore_eos=True,
            stop_token_ids=stops,
            detokenize=False,
            skip_special_tokens=False,
            extra_args=extra,
            output_kind=RequestOutputKind.DELTA if cond else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Run one generation; yield the cond sequence's new ids as they come. Cancelling the iteration
        (or :meth:`abort`) ends every request of it. :meth:`check` ran when the request was prepared."""
        self._check_id(req)
        rows = row_specs(req, self._span_ids)
        rid = req.request_id
        self._inflight[rid] = False
        self._unconds[rid] = []
        uncond_tasks: list[asyncio.Task] = []
        # reference mode: follow the cond row's image spans; each header it closes starts that image's uncond
        spans = ImageSpans(self._span_ids) if req.image_only_uncond else None
        generated = 0
        finished = False
        try:
            if len(rows) == 2:
                uid, uprompt, uspec = rows[1]
                uncond_tasks.append(self._start_uncond(req, uid, uprompt, uspec, req.max_new_tokens))
            cid, cprompt, cspec = rows[0]
            params = self._sampling_params(req, cspec.to_extra(), cond=True, max_tokens=req.max_new_tokens)
            last = time.perf_counter()
            async for out in self._llm.generate({"prompt_token_ids": list(cprompt)}, params, cid):
                completion = out.outputs[0]
                ids = list(completion.token_ids)
                now = time.perf_counter()
                if ids:
                    self._inflight[rid] = True
                if spans is not None:
                    for token in ids:
                        generated += 1
                        grid = spans.feed(token)
                        if grid is not None:
                            image = image_uncond(req, len(uncond_tasks) + 1, spans.tokens, grid, generated)
                            if image.max_tokens > 0:
                                uncond_tasks.append(self._start_uncond(req, image.request_id, image.prompt,
                                                                       image.spec, image.max_tokens))
                reason = completion.finish_reason if out.finished else None
                if reason is not None and ids and ids[-1] == self.tokenizer.ids.pad:
                    finished = True
                    raise PairBrokenError(f"generation {rid}: cond/uncond pair lost lockstep")
                if reason is not None:
                    finished = True
                    reason = {"stop": "stop", "length": "length"}.get(str(reason), "abort")
                if ids or reason is not None:
                    yield TokenDelta(ids, reason, now - last)
                last = now
                if reason is not None:
                    break
            if not finished:  # the stream ended without a final output (aborted elsewhere)
                finished = True
                yield TokenDelta([], "abort", 0.0)
            for task in uncond_tasks:
                await task
        except (asyncio.CancelledError, EngineError):
            raise
        except Exception as exc:
            if self.dead:  # vLLM's EngineDeadError / EngineGenerateError after its core process went away
                finished = True  # nothing to abort in a dead engine
                raise EngineUnavailableError(f"the engine died during generation {rid}") from exc
            raise
        finally:
            self._inflight.pop(rid, None)
            uncond_ids = self._unconds.pop(rid, [])
            for task in uncond_tasks:
                if not task.done():
                    task.cancel()
            if not finished:
                await self._abort_ids([rid, *uncond_ids])

    def _start_uncond(self, req: GenerationRequest, rid: str, prompt: list[int], spec: RowSpec,
                      max_tokens: int) -> asyncio.Task:
        """Run an uncond request in the background (its tokens are forced to the cond row's)."""
        self._unconds.setdefault(req.request_id, []).append(rid)
        params = self._sampling_params(req, spec.to_extra(), cond=False, max_tokens=max_tokens)
        return asyncio.create_task(self._drain(rid, prompt, params, req.request_id))

    async def _drain(self, rid: str, prompt: list[int], params: Any, owner: str) -> list[int]:
        """Run an uncond request to its end; return its ids (the processor gave it the cond half's)."""
        ids: list[int] = []
        async for out in self._llm.generate({"prompt_token_ids": list(prompt)}, params, rid):
            ids = list(out.outputs[0].token_ids)
            if out.finished:
                self._note_uncond_prefill(len(prompt), getattr(out, "num_cached_tokens", None))
        return ids

    def _note_uncond_prefill(self, prompt_tokens: int, cached: int | None) -> None:
        """Count the prompt tokens uncond requests really prefilled (prefix-cache hits excluded)."""
        self.uncond_prefill.requests += 1
        self.uncond_prefill.prompt_tokens += prompt_tokens
        self.uncond_prefill.computed_tokens += prompt_tokens - int(cached or 0)

    async def abort(self, request_id: str) -> None:
        """End a generation: every request of it stops and frees its KV blocks."""
        await self._abort_ids([request_id, request_id + UNCOND_SUFFIX, *self._unconds.get(request_id, [])])

    async def _abort_ids(self, ids: list[str]) -> None:
        if self._llm is None:
            return
        with contextlib.suppress(Exception):
            await self._llm.abort(ids)
