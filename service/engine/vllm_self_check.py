"""Start-up self-check: vLLM really runs the Emu3.5 scheduler and logits processor.

Asking vLLM for ``scheduler_cls`` and ``logits_processors`` is not proof that they run. vllm-ascend
replaces the whole scheduler config when its ``additional_config`` turns on one of its own schedulers,
and a platform's ``check_and_update_config`` may rewrite the config after the service built its
arguments. Without the pair scheduler the two halves of a pair drift apart; without the processor
vLLM samples unguided. Neither fails loudly, so the engine refuses to start instead.

Two checks, both at start:

1. **The final config** (after every platform hook ran) names a scheduler that is the Emu3.5 one and
   lists the Emu3.5 processor, with async scheduling off (on vLLM 0.11 it replaces the scheduler).
2. **A probe request** of one token: the pair scheduler stamps what it admits and the processor forces
   one of two tokens depending on that stamp (``pairing.PROBE_KEY``). The answer shows what the engine
   core and the workers actually run, whatever their configs say.
"""

from __future__ import annotations

import importlib
from typing import Any

from service.engine.config import PROCESSOR_REF, SCHEDULER_REF
from service.engine.policy.pairing import probe_extra
from service.engine.protocol import EngineError

PROBE_REQUEST_ID = "emu35-self-check"


class EngineSelfCheckError(EngineError):
    """vLLM does not run the Emu3.5 extension points it was given; the engine must not serve."""


def _resolve(ref: Any) -> Any:
    """A class from a class or a dotted / ``module:Class`` name (how vLLM accepts both)."""
    if not isinstance(ref, str):
        return ref
    module, sep, name = ref.partition(":") if ":" in ref else ref.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _scheduler_class(scheduler_config: Any) -> Any:
    getter = getattr(scheduler_config, "get_scheduler_cls", None)  # 0.32; 0.11 keeps the field only
    return getter() if callable(getter) else _resolve(scheduler_config.scheduler_cls)


def final_config_problems(vllm_config: Any) -> list[str]:
    """What in vLLM's final config would run generations without the Emu3.5 rules (empty when fine)."""
    from service.engine.in_vllm.scheduler import Emu35Scheduler

    problems = []
    sched = _scheduler_class(vllm_config.scheduler_config)
    if not (isinstance(sched, type) and issubclass(sched, Emu35Scheduler)):
        name = getattr(sched, "__module__", "?") + "." + getattr(sched, "__qualname__", repr(sched))
        problems.append(
            f"vLLM's final config runs the scheduler {name}, not {SCHEDULER_REF} (vllm-ascend's "
            "ascend_scheduler_config / recompute_scheduler_enable / dynamic batching, or async scheduling, "
            "replace it); turn those off")
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        problems.append("async scheduling is on; the Emu3.5 processor needs it off")
    processors = list(getattr(vllm_config.model_config, "logits_processors", None) or [])
    ours = _resolve(PROCESSOR_REF)
    if not any(p == PROCESSOR_REF or _resolve(p) is ours for p in processors):
        problems.append(f"vLLM's final config does not list the logits processor {PROCESSOR_REF} "
                        f"(it lists {processors})")
    return problems


def probe_problem(got: list[int], admitted: int, other: int) -> str | None:
    """What the probe's answer says is wrong (None when the pair scheduler and the processor both ran)."""
    if got == [admitted]:
        return None
    if got == [other]:
        return ("the Emu3.5 logits processor runs in the workers, but the probe was admitted by another "
                "scheduler than Emu35Scheduler: something replaced scheduler_cls in the engine core")
    return (f"the Emu3.5 logits processor did not answer the probe (got ids {got}, expected [{admitted}]): "
            "the workers run without it, so generations would be unguided")


async def probe(llm: Any, admitted: int, other: int, prompt: list[int]) -> list[int]:
    """Run the one-token probe request through a started ``AsyncLLM``; return the ids it produced."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False,
                            extra_args=probe_extra(admitted, other), output_kind=RequestOutputKind.FINAL_ONLY)
    got: list[int] = []
    async for out in llm.generate({"prompt_token_ids": list(prompt)}, params, PROBE_REQUEST_ID):
        got = list(out.outputs[0].token_ids)
    return got


async def run_self_check(llm: Any, admitted: int, other: int, prompt: list[int]) -> None:
    """Both checks against a started ``AsyncLLM``; raises :class:`EngineSelfCheckError`."""
    problems = final_config_problems(llm.vllm_config)
    if problems:
        raise EngineSelfCheckError("engine self-check failed: " + "; ".join(problems))
    problem = probe_problem(await probe(llm, admitted, other, prompt), admitted, other)
    if problem:
        raise EngineSelfCheckError("engine self-check failed: " + problem)
