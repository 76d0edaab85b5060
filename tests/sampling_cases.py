"""Random generations inside the documented request ranges (design.md §10), for the property tests of
both engines: whatever the sampling settings and the seed, every answer must parse as a valid layout.

Answers are kept short (an image may be cut off, which is a valid, reported layout), and the settings
lean towards the hostile end — high temperatures and whole-vocabulary top-k — because that is where the
text sampler writes control tokens such as IMG or ``<|extra_5|>``.
"""

from __future__ import annotations

from hypothesis import strategies as st

from service.task import GenerationOptions, plan_request
from service.token_layout import parse
from service.types import GenerationRequest, SamplingSettings

TOP_K = st.one_of(st.integers(1, 64), st.integers(65, 300_000))
TOP_P = st.floats(0.01, 1.0)
TEMPERATURE = st.one_of(st.floats(0.0, 100.0), st.sampled_from([0.0, 2.0, 61.3, 100.0]))
SETTINGS = st.builds(SamplingSettings, TOP_K, TOP_P, TEMPERATURE)
SEED = st.one_of(st.none(), st.integers(0, 2**63 - 1))
TASK_SIZE = st.sampled_from([("t2i", "32x32"), ("t2i", "auto"), ("story", "32x32"), ("story", "auto"),
                             ("howto", None)])


@st.composite
def generation_case(draw) -> dict:
    task, size = draw(TASK_SIZE)
    return dict(task=task, size=size, text=draw(SETTINGS), image=draw(SETTINGS), seed=draw(SEED),
                cfg_scale=draw(st.sampled_from([1.0, 3.0, 50.0])), max_new_tokens=draw(st.integers(12, 48)),
                prompt=draw(st.sampled_from(["#", "a cat", "a robot in the city"])))


def build(tok, case: dict, rid: str) -> GenerationRequest:
    opts = GenerationOptions(size=case["size"], text=case["text"], image=case["image"], seed=case["seed"],
                             cfg_scale=case["cfg_scale"], max_new_tokens=case["max_new_tokens"])
    return plan_request(tok, case["task"], case["prompt"], [], opts, rid)


def assert_parses(tok, ids: list[int], case: dict) -> None:
    """The answer parses (TokenLayoutError would fail the test) and stays within its token budget."""
    assert len(ids) <= case["max_new_tokens"], case
    parse(tok, ids)
