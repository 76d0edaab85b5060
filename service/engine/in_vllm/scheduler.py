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

In the ``reference`` uncond mode (design.md §5.2) a cond request runs alone between images, and each
image's uncond request is submitted by the engine front end once it has seen the image's header. The
scheduler keeps such a pair in step with one more rule: a cond request whose next token is a pixel
(it has written IMG) is not scheduled until its uncond request runs with it. It stays in vLLM's
running list, keeps its KV blocks and is only left out of the step, which vLLM supports (running
requests are skipped whenever the token budget runs out); the logits processor parks its row state
meanwhile. The cond's mode is followed from its output ids with ``spans.next_mode``.

Portable across vLLM 0.11 and 0.32: only ``schedule(*args, **kwargs)`` is overridden, and only
``waiting`` / ``running`` / ``kv_cache_manager.block_pool`` / request fields present in both are used.
Requests are paired through ``SamplingParams.extra_args`` (0.32 rewrites request ids).
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from service.engine.policy.admission import Budget, Candidate, blocks_for, decide
from service.engine.policy.pairing import ADMITTED_BY, ADMITTED_KEY, COND, SOLO, UNCOND, RowSpec, is_emu35_request
from service.engine.policy.spans import PIXELS, TEXT, next_mode

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the signature differs across versions
        super().__init__(*args, **kwargs)
        #: reference-mode conds followed into images: request id -> (output ids read, mode after them)
        self._cond_modes: dict[str, tuple[int, int]] = {}

    def schedule(self, *args: Any, **kwargs: Any):  # noqa: D102 - signature differs across versions
        held, waiting_for_uncond = self._hold_back()
        running_before = {r.request_id for r in self.running if _spec(r) is not None}
        parked = self._park(waiting_for_uncond)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            for index, request in parked:  # back in place: they run again once their uncond does
                self.running.insert(min(index, len(self.running)), request)
            for request in reversed(held):  # prepend one by one: prepend_requests' order differs by version
                self.waiting.prepend_request(request)
        self._check(output, running_before - {r.request_id for _, r in parked})
        return output

    def _park(self, conds: set[str]) -> list[tuple[int, Any]]:
        """Take the reference conds waiting for their image's uncond out of ``self.running`` for this
        step (in place: vLLM may hold the list elsewhere); return them with their positions."""
        parked = [(i, r) for i, r in enumerate(self.running) if r.request_id in conds]
        for _, r in parked:
            self.running.remove(r)
        return parked

    # ---- admission ------------------------------------------------------------------------------
    def _reserved_blocks(self) -> int:
        """Blocks the running requests may still claim: worst case minus what they hold already."""
        total = 0
        for r in self.running:
            total += max(0, blocks_for(_max_total(r), self.block_size) - blocks_for(r.num_computed_tokens, self.block_size))
        return total

    def _image_only_pairs(self) -> tuple[dict[str, tuple[Any, RowSpec]], set[str]]:
        """Running reference-mode conds (with their specs) by pair id, and the pair ids whose image uncond
        runs now."""
        conds: dict[str, tuple[Any, RowSpec]] = {}
        unconds: set[str] = set()
        for r in self.running:
            spec = _spec(r)
            if spec is None or not spec.image_only:
                continue
            if spec.role == COND:
                conds[spec.pair_id] = (r, spec)
            elif spec.role == UNCOND:
                unconds.add(spec.pair_id)
        return conds, unconds

    def _hold_back(self) -> tuple[list[Any], set[str]]:
        """Take out of ``self.waiting`` every request that may not start now; return them in queue order,
        and the ids of the running reference conds that must sit this step out (next token a pixel,
        their image's uncond not running and not admitted now)."""
        self._forget_finished()
        conds, with_uncond = self._image_only_pairs()
        lone = {pair: cond for pair, cond in conds.items() if pair not in with_uncond}
        ghost = {pair: blocks_for(spec.uncond_reserve, self.block_size) for pair, (_, spec) in lone.items()}
        candidates = []
        for r in self.waiting:
            _stamp(r)
            candidates.append(self._candidate(r, ghost))
        pool = self.kv_cache_manager.block_pool
        budget = Budget(
            free_blocks=pool.get_num_free_blocks(),
            reserved_blocks=self._reserved_blocks() + sum(ghost.values()),
            block_size=self.block_size,
            token_budget=self.max_num_scheduled_tokens,
            running=len(self.running) + len(lone),  # a lone reference cond holds its uncond's slot
            max_running=self.max_num_running_reqs,
            total_blocks=pool.num_gpu_blocks - 1,  # block 0 is vLLM's null block
        )
        decision = decide(candidates, budget) if candidates else None
        admitted_unconds = set()
        held: list[Any] = []
        if decision is not None:
            for r in decision.impossible:
                logger.error("emu35: request %s can never be admitted (needs more KV or budget than the engine has)",
                             r.request_id)
            held = decision.hold + decision.impossible
            if held:
                self.waiting.remove_requests(held)
            order = {id(r): i for i, r in enumerate(c.item for c in candidates)}
            held = sorted(held, key=lambda r: order[id(r)])
            for r in decision.admit:
                spec = _spec(r)
                if spec is not None and spec.image_only and spec.role == UNCOND:
                    admitted_unconds.add(spec.pair_id)
        waiting_for_uncond = {r.request_id for pair, (r, spec) in lone.items()
                              if pair not in admitted_unconds and self._next_is_pixel(r, spec)}
        return held, waiting_for_uncond

    def _candidate(self, r: Any, ghost: dict[str, int]) -> Candidate:
        spec = _spec(r)
        prompt_left = int(r.num_prompt_tokens) - int(r.num_computed_tokens)
        if spec is None or spec.role == SOLO:
            return Candidate(r, spec.pair_id if spec else r.request_id, 1, prompt_left, _max_total(r))
        if not spec.image_only:
            return Candidate(r, spec.pair_id, 2, prompt_left, _max_total(r))
        if spec.role == COND:  # starts alone, with its image unconds' worst case reserved
            return Candidate(r, spec.pair_id, 1, prompt_left, _max_total(r), reserve_tokens=spec.uncond_reserve)
        prepaid = ghost.get(spec.pair_id)
        return Candidate(r, r.request_id, 1, self._uncached_prompt(r), _max_total(r),
                         prepaid_blocks=prepaid or 0, prepaid_seqs=1 if prepaid is not None else 0)

    def _uncached_prompt(self, request: Any) -> int:
        """Prompt tokens an image's uncond request will really prefill: its prompt repeats the uncond
        prompt and earlier images, which the prefix cache mostly holds. Asks vLLM's own lookup (it
        returns the hit length second on 0.11 and 0.32; on 0.11 it also counts the query in the prefix
        cache stats); the whole prompt if that fails."""
        whole = int(request.num_prompt_tokens) - int(request.num_computed_tokens)
        try:
            hit = int(self.kv_cache_manager.get_computed_blocks(request)[1])
        except Exception:  # noqa: BLE001 - an estimate: never let it stop the engine core
            return whole
        return max(1, min(whole, int(request.num_prompt_tokens) - hit))

    def _next_is_pixel(self, request: Any, spec: RowSpec) -> bool:
        """Whether a reference cond has written IMG and not yet EOI: its next token needs the uncond."""
        if spec.switch_ids is None:
            return False
        seen, mode = self._cond_modes.get(request.request_id, (0, TEXT))
        out = request.output_token_ids
        for t in out[seen:]:
            mode = next_mode(mode, int(t), spec.switch_ids)
        self._cond_modes[request.request_id] = (len(out), mode)
        return mode == PIXELS

    def _forget_finished(self) -> None:
        """Drop the followed modes of requests vLLM no longer tracks (checked only as they pile up)."""
        if len(self._cond_modes) > 2 * max(1, self.max_num_running_reqs):
            for rid in [rid for rid in self._cond_modes if rid not in self.requests]:
                del self._cond_modes[rid]

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
