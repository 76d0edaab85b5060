"""Pair admission (the policy behind the vLLM scheduler), on plain numbers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.engine.policy.admission import Budget, Candidate, blocks_for, decide

BS = 16


def budget(free=100, reserved=0, tokens=1000, running=0, max_running=16, total=100) -> Budget:
    return Budget(free, reserved, BS, tokens, running, max_running, total)


def pair(name: str, prompt=10, total=40) -> list[Candidate]:
    return [Candidate(f"{name}/c", name, 2, prompt, total), Candidate(f"{name}/u", name, 2, prompt, total)]


def test_blocks_round_up():
    assert [blocks_for(n, 16) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_a_pair_waits_for_its_second_half_without_blocking_others():
    d = decide([pair("a")[0], *pair("b")], budget())
    assert d.admit == ["b/c", "b/u"] and d.hold == ["a/c"]


def test_a_pair_is_admitted_only_when_both_worst_cases_fit():
    # each half needs ceil(40/16) = 3 blocks → 6 per pair
    assert decide(pair("a"), budget(free=6)).admit == ["a/c", "a/u"]
    assert decide(pair("a"), budget(free=5)).hold == ["a/c", "a/u"]
    # blocks the running requests may still claim are not free for newcomers
    assert decide(pair("a"), budget(free=10, reserved=5)).hold == ["a/c", "a/u"]


def test_both_prompts_must_fit_one_step_with_the_running_decodes():
    assert decide(pair("a", prompt=100), budget(tokens=204, running=4)).admit == ["a/c", "a/u"]
    assert decide(pair("a", prompt=100), budget(tokens=203, running=4)).hold == ["a/c", "a/u"]
    assert decide(pair("a"), budget(running=15, max_running=16)).hold == ["a/c", "a/u"]


def test_first_come_first_served_no_overtaking():
    big, small = pair("big", total=160), pair("small")
    d = decide([*big, *small], budget(free=12, total=100))
    assert d.admit == [] and d.hold == ["big/c", "big/u", "small/c", "small/u"]


def test_a_group_that_can_never_fit_is_reported_and_does_not_block():
    d = decide([*pair("huge", total=5000), *pair("ok")], budget(free=100, total=100))
    assert d.impossible == ["huge/c", "huge/u"] and d.admit == ["ok/c", "ok/u"]


def test_solo_requests_are_groups_of_one():
    d = decide([Candidate("s", "s", 1, 10, 40)], budget(free=3))
    assert d.admit == ["s"]


@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 200), st.booleans()), max_size=12),
       st.integers(0, 80), st.integers(0, 40), st.integers(50, 400), st.integers(0, 10))
def test_admitted_work_never_exceeds_any_budget(groups, free, reserved, tokens, running):
    cands = []
    for i, (prompt, new, complete) in enumerate(groups):
        members = pair(f"g{i}", prompt, prompt + new)
        cands += members if complete else members[:1]
    b = budget(free=free, reserved=reserved, tokens=tokens, running=running, max_running=16, total=80)
    d = decide(cands, b)
    admitted = [c for c in cands if c.item in d.admit]
    assert sum(blocks_for(c.max_total_tokens, BS) for c in admitted) <= max(0, free - reserved)
    assert sum(c.prompt_tokens for c in admitted) <= tokens - running
    assert len(admitted) <= 16 - running
    by_group: dict = {}
    for c in admitted:
        by_group.setdefault(c.group, []).append(c)
    assert all(len(m) == 2 for m in by_group.values())  # never half a pair
    assert sorted(d.admit + d.hold + d.impossible) == sorted(c.item for c in cands)
