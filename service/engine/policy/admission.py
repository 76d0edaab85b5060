"""Which waiting Emu3.5 requests may start this step: the pair-admission policy, free of vLLM.

The pair-aware scheduler (``service.engine.in_vllm.scheduler``) asks this module before every step. Keeping
the policy here, over plain numbers, lets it be tested exhaustively without an engine and read in one
place. The rules (design.md §9):

* a cond/uncond pair starts only when both halves have reached the engine core;
* it starts only when the KV blocks for both halves at their *maximum* length fit into the free blocks
  left after every running request's own worst case, so nothing running is ever preempted;
* both prompts must fit into this step's token budget (together with one decode token per running
  request) and the sequence limit, so both prefills complete in the same step;
* first come, first served: the first group that does not fit stops admission (no overtaking, so a
  large request is never starved by small ones). A group that can never fit (larger than the whole
  cache or budget) is reported so the engine can fail it instead of waiting forever.

In the ``reference`` uncond mode (design.md §5.2) a guided generation starts as its cond request alone;
each image then brings an uncond request of its own. So that an image can always start, a reference
cond is admitted only when its future uncond's worst case fits too (``reserve_tokens``, and one more
sequence), and that reservation is held while no uncond of it runs. The uncond of an image is a
continuation of running work: it goes ahead of the queue and is paid from its cond's reservation
(``prepaid_blocks``, ``prepaid_seqs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Hashable, Iterable, TypeVar

T = TypeVar("T")


def blocks_for(tokens: int, block_size: int) -> int:
    """KV blocks that hold ``tokens`` tokens."""
    return -(-max(0, tokens) // block_size)


@dataclass(frozen=True)
class Candidate(Generic[T]):
    """One waiting vLLM request, as admission sees it."""

    item: T
    group: Hashable  # pair id; a request alone in its group is a solo (unguided) request
    group_size: int  # how many requests the group needs (2 for a guided pair, 1 otherwise)
    prompt_tokens: int  # tokens still to prefill
    max_total_tokens: int  # prompt + max new tokens: the request's worst-case length
    reserve_tokens: int = 0  # a reference cond: its uncond requests' worst case, reserved with it
    prepaid_blocks: int = 0  # an image's uncond: blocks its cond's reservation already holds for it
    prepaid_seqs: int = 0  # ... and the sequence slot held for it

    @property
    def continuation(self) -> bool:
        """An image's uncond request of a running reference cond: admitted ahead of new work."""
        return self.prepaid_seqs > 0


@dataclass(frozen=True)
class Budget:
    free_blocks: int  # free KV blocks now
    reserved_blocks: int  # blocks running requests (and reservations) may still claim before they finish
    block_size: int
    token_budget: int  # tokens one step may schedule
    running: int  # sequences running now (each takes one decode token this step), plus held slots
    max_running: int  # sequence limit
    total_blocks: int  # the whole cache


@dataclass
class Decision(Generic[T]):
    admit: list[T] = field(default_factory=list)
    hold: list[T] = field(default_factory=list)
    impossible: list[T] = field(default_factory=list)


def decide(candidates: Iterable[Candidate[T]], budget: Budget) -> Decision[T]:
    """Split the waiting requests (in queue order) into admitted, held and never-admissible ones."""
    groups: dict[Hashable, list[Candidate[T]]] = {}
    order: list[Hashable] = []
    ordered = sorted(candidates, key=lambda c: not c.continuation)  # stable: queue order otherwise
    for c in ordered:
        if c.group not in groups:
            groups[c.group] = []
            order.append(c.group)
        groups[c.group].append(c)

    out: Decision[T] = Decision()
    blocks_left = budget.free_blocks - budget.reserved_blocks
    tokens_left = budget.token_budget - budget.running
    seqs_left = budget.max_running - budget.running
    blocked = False
    for g in order:
        members = groups[g]
        need_blocks = sum(blocks_for(c.max_total_tokens, budget.block_size)
                          + blocks_for(c.reserve_tokens, budget.block_size) for c in members)
        need_tokens = sum(c.prompt_tokens for c in members)
        need_seqs = len(members) + sum(1 for c in members if c.reserve_tokens > 0)
        if need_blocks > budget.total_blocks or need_tokens > budget.token_budget or need_seqs > budget.max_running:
            out.impossible.extend(c.item for c in members)
            continue
        need_blocks -= sum(c.prepaid_blocks for c in members)
        need_seqs -= sum(c.prepaid_seqs for c in members)
        complete = len(members) >= members[0].group_size
        fits = need_blocks <= blocks_left and need_tokens <= tokens_left and need_seqs <= seqs_left
        if blocked or not complete or not fits:
            out.hold.extend(c.item for c in members)
            # an incomplete pair (its partner still in flight) does not block the queue; a pair that
            # does not fit does, so it cannot be overtaken forever
            blocked = blocked or (complete and not fits)
            continue
        out.admit.extend(c.item for c in members)
        blocks_left -= need_blocks
        tokens_left -= need_tokens
        seqs_left -= need_seqs
    return out
