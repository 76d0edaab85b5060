"""Pair-aware scheduling for vLLM (passed with ``scheduler_cls="service.engine.in_vllm.scheduler.Emu35Scheduler"``).

vLLM's scheduler admits waiting requests one by one while KV space and the token budget last, and
preempts the newest running request when a running one needs a block it cannot get. Either would tear
a cond/uncond pair apart. This subclass changes only *which waiting requests vLLM may see* at each step:
before ``schedule()`` it takes out of the waiting queue every request that ``admission.decide`` does not
admit now, lets vLLM schedule the rest, and puts the held ones back in their order. Because a request is
admitted only when its worst-case KV is free, vLLM never needs to preempt, and because both halves'
prompts fit the step's budget, their prefills complete in the same step. The scheduler also checks
afterwards that no Emu3.5 request was preempted or left half-prefilled and logs an error if so; the
logits processor then fails the pair (it sees the two halves drift apart) rather than continue it.

Portable across vLLM 0.11 and 0.32: only ``schedule(*args, **kwargs)`` is overridden, and only
``waiting`` / ``running`` / ``kv_cache_manager.block_pool`` / request fields present in both are used.
Requests are paired through ``SamplingParams.extra_args`` (0.32 rewrites request ids).
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from service.engine.policy.admission import Budget, Candidate, blocks_for, decide
from service.engine.policy.pairing import ADMITTED_BY, ADMITTED_KEY, SOLO, RowSpec, is_emu35_request

logger = logging.getLogger(__name__)

def _spec(request: Any) -> RowSpec | None:
    params = getattr(request, "sampling_params", None)
    return RowSpec.from_extra(getattr(params, "extra_args", None)) if params is not None else None


def _stamp(request: Any) -> None:
    """Mark an Emu3.5 request as seen by this scheduler. The mark travels to the workers inside
    ``SamplingParams.extra_args``, where the logits processor answers the start-up probe with it."""
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    if extra is not None and is_emu35_request(extra):
        extra[ADMITTED_KEY] = ADMITTED_BY


def _max_total(request: Any) -> int:
    return int(request.num_prompt_tokens) + int(request.max_tokens)


class Emu35Scheduler(Scheduler):
    """vLLM's scheduler with Emu3.5's pair admission in front of it."""

    def schedule(self, *args: Any, **kwargs: Any):  # noqa: D102 - signature differs across versions
        held = self._hold_back()
        running_before = {r.request_id for r in self.running if _spec(r) is not None}
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            for request in reversed(held):  # prepend one by one: prepend_requests' order differs by version
                self.waiting.prepend_request(request)
        self._check(output, running_before)
        return output

    # ---- admission ------------------------------------------------------------------------------
    def _reserved_blocks(self) -> int:
        """Blocks the running requests may still claim: worst case minus what they hold already."""
        total = 0
        for r in self.running:
            total += max(0, blocks_for(_max_total(r), self.block_size) - blocks_for(r.num_computed_tokens, self.block_size))
        return total

    def _hold_back(self) -> list[Any]:
        """Take out of ``self.waiting`` every request that may not start now; return them in queue order."""
        if not self.waiting:
            return []
        candidates = []
        for r in self.waiting:
            _stamp(r)
            spec = _spec(r)
            if spec is None or spec.role == SOLO:
                group, size = (spec.pair_id if spec else r.request_id), 1
            else:
                group, size = spec.pair_id, 2
            candidates.append(Candidate(r, group, size, int(r.num_prompt_tokens) - int(r.num_computed_tokens), _max_total(r)))
        pool = self.kv_cache_manager.block_pool
        budget = Budget(
            free_blocks=pool.get_num_free_blocks(),
            reserved_blocks=self._reserved_blocks(),
            block_size=self.block_size,
            token_budget=self.max_num_scheduled_tokens,
            running=len(self.running),
            max_running=self.max_num_running_reqs,
            total_blocks=pool.num_gpu_blocks - 1,  # block 0 is vLLM's null block
        )
        decision = decide(candidates, budget)
        for r in decision.impossible:
            logger.error("emu35: request %s can never be admitted (needs more KV or budget than the engine has)",
                         r.request_id)
        held = decision.hold + decision.impossible
        if held:
            self.waiting.remove_requests(held)
        order = {id(r): i for i, r in enumerate(c.item for c in candidates)}
        return sorted(held, key=lambda r: order[id(r)])

    # ---- invariants -----------------------------------------------------------------------------
    def _check(self, output: Any, running_before: set[str]) -> None:
        """Log (never raise: the engine core must survive) when a pair invariant was broken this step."""
        scheduled = output.num_scheduled_tokens
        for rid in running_before:
            if rid not in scheduled and rid in self.requests and not self.requests[rid].is_finished():
                logger.error("emu35: running request %s was not scheduled (preempted?)", rid)
        for new in output.scheduled_new_reqs:
            r = self.requests.get(new.req_id)
            if r is not None and _spec(r) is not None and r.num_computed_tokens < r.num_prompt_tokens:
                logger.error("emu35: request %s prefill did not complete in one step", new.req_id)
