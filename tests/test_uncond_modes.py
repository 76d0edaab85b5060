"""The two forms of the unconditional branch (design.md §5.2; issue 14 item 10), without vLLM.

``lockstep``: the uncond sequence receives every generated token. ``reference`` (the release's
transformers path): it sees the uncond prompt and the generated image spans only. These tests cover the
pieces both engines share (span tracking, the per-image uncond requests, admission with reservations)
and the reference engine; ``test_vllm_engine`` checks the vLLM engine against it.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.engine.policy.admission import Budget, Candidate, blocks_for, decide
from service.engine.policy.pairing import COND, UNCOND, UNCOND_SUFFIX, RowSpec, image_uncond, row_specs
from service.engine.policy.spans import ImageSpans, SpanTokens, header_grid, image_body_tokens
from service.schema.emu35 import InterleavedRequest, T2IRequest
from service.task import GenerationOptions, plan_request
from service.token_layout import ImageSegment, parse
from service.types import GenerationRequest, SamplingSettings

GREEDY = SamplingSettings(1, 1.0, 1.0)
IDS = SpanTokens(boi=100, img=101, eoi=102, star=9, digits=tuple(range(15, 25)))
EOL = 103
TEXT_TOKEN = st.integers(0, 8)  # ids that switch nothing (text, as the rules see it)


def _image(rows: int, cols: int, pixel: int = 500) -> list[int]:
    """An image as the rules write it: BOI, ``rows*cols`` header digits, IMG, rows ending in EOL, EOI last."""
    header = [IDS.digits[int(c)] for c in str(rows)] + [IDS.star] + [IDS.digits[int(c)] for c in str(cols)]
    body = []
    for r in range(rows):
        body += [pixel] * cols + [IDS.eoi if r == rows - 1 else EOL]
    return [IDS.boi, *header, IDS.img, *body]


@given(st.lists(st.one_of(st.lists(TEXT_TOKEN, min_size=1, max_size=5),
                          st.tuples(st.integers(1, 12), st.integers(1, 12))), max_size=6))
def test_image_spans_are_exactly_the_generated_images(segments):
    """Text between images never reaches the uncond branch; every BOI…EOI span does, header included,
    and each closed header reports its grid."""
    tokens, want, grids = [], [], []
    for seg in segments:
        if isinstance(seg, tuple):
            span = _image(*seg)
            tokens += span
            want += span
            grids.append(seg)
        else:
            tokens += seg
    spans = ImageSpans(IDS)
    assert spans.feed_all(tokens) == grids
    assert spans.tokens == want


def test_image_tokens_sampled_in_text_stay_out_of_the_spans():
    """IMG, EOL or EOI written in text mode do not open an image (as in the release), so they are text."""
    spans = ImageSpans(IDS)
    assert spans.feed_all([IDS.img, EOL, IDS.eoi, 5]) == []
    assert spans.tokens == []


def test_header_grid_reads_the_digits_and_refuses_a_malformed_header():
    d = IDS.digits
    assert header_grid([d[5], d[5], IDS.star, d[7], d[3]], IDS) == (55, 73)
    assert header_grid([d[5], d[5]], IDS) == (0, 0)
    assert header_grid([IDS.star, d[3]], IDS) == (0, 0)
    assert image_body_tokens((2, 3)) == 8  # two rows of 3 pixels + EOL, the last EOL is EOI


def _request(mode: str, guided: bool = True, max_new: int = 200) -> GenerationRequest:
    return GenerationRequest("g", [1, 2, 3], [1, 4] if guided else None, 3.0, GREEDY, GREEDY, max_new, (7,),
                             uncond_mode=mode)  # type: ignore[arg-type]


def test_a_lockstep_pair_starts_as_two_requests_a_reference_one_as_its_cond_alone():
    lock = row_specs(_request("lockstep"), IDS)
    assert [(rid, spec.role) for rid, _, spec in lock] == [("g", COND), ("g" + UNCOND_SUFFIX, UNCOND)]
    ref = row_specs(_request("reference"), IDS)
    assert [(rid, spec.role) for rid, _, spec in ref] == [("g", COND)]
    spec = ref[0][2]
    assert spec.image_only and spec.uncond_reserve == 2 + 200 and spec.switch_ids == (100, 101, 102)
    assert RowSpec.from_extra(spec.to_extra()) == spec
    # unguided requests have no uncond branch in either mode
    assert [s.role for _, _, s in row_specs(_request("reference", guided=False), IDS)] == ["solo"]


def test_an_images_uncond_request_holds_the_uncond_prompt_and_the_spans_and_ends_with_the_image():
    req = _request("reference", max_new=60)
    spans = _image(2, 3)[:6] + _image(2, 3)  # a finished image, then the header of the next one
    image = image_uncond(req, 2, spans, (2, 3), generated=40)
    assert image.request_id == "g" + UNCOND_SUFFIX + "2"
    assert image.prompt == [1, 4, *spans]
    assert image.spec.role == UNCOND and image.spec.image_only and image.spec.seed is None
    assert image.max_tokens == image_body_tokens((2, 3))
    # a cond row that will hit its token limit inside the image: the uncond stops with it
    assert image_uncond(req, 2, spans, (2, 3), generated=55).max_tokens == 5


def test_unknown_uncond_modes_are_refused_at_every_layer():
    with pytest.raises(ValueError, match="uncond_mode"):
        _request("both")
    with pytest.raises(ValueError, match="uncond mode"):
        RowSpec.from_extra({"emu35": {**RowSpec("g", COND, 3.0, GREEDY, GREEDY, None, None).to_extra()["emu35"],
                                       "uncond": "both"}})
    with pytest.raises(ValidationError):
        T2IRequest.model_validate({"prompt": "x", "uncond_mode": "both"})
    assert InterleavedRequest.model_validate({"prompt": "x", "uncond_mode": "reference"}).uncond_mode == "reference"


def test_the_option_reaches_the_engine_request(tiny_tokenizer):
    opts = GenerationOptions(size="64x64", uncond_mode="reference")
    req = plan_request(tiny_tokenizer, "howto", "tea", [], opts, "r")
    assert req.uncond_mode == "reference" and req.image_only_uncond
    assert plan_request(tiny_tokenizer, "howto", "tea", [], GenerationOptions(), "l").uncond_mode == "lockstep"


# ---- admission with reservations -----------------------------------------------------------------
BS = 16


def _budget(free=100, reserved=0, tokens=1000, running=0, max_running=16) -> Budget:
    return Budget(free, reserved, BS, tokens, running, max_running, 100)


def test_a_reference_cond_starts_only_when_its_unconds_worst_case_fits_too():
    cond = Candidate("c", "p", 1, 10, 40, reserve_tokens=40)  # 3 blocks + 3 reserved
    assert decide([cond], _budget(free=6)).admit == ["c"]
    assert decide([cond], _budget(free=5)).hold == ["c"]
    # and a sequence slot for its uncond
    assert decide([cond], _budget(running=14, max_running=16)).admit == ["c"]
    assert decide([cond], _budget(running=15, max_running=16)).hold == ["c"]


def test_an_images_uncond_goes_ahead_of_the_queue_and_is_paid_from_its_reservation():
    queued = [Candidate("new/c", "new", 2, 10, 40), Candidate("new/u", "new", 2, 10, 40)]
    image = Candidate("old#uncond1", "old#uncond1", 1, 8, 40, prepaid_blocks=3, prepaid_seqs=1)
    # nothing is free beyond the reservation the running cond holds for it: it still starts, the pair waits
    d = decide([*queued, image], _budget(free=3, reserved=3, running=1, max_running=2))
    assert d.admit == ["old#uncond1"] and d.hold == ["new/c", "new/u"]


@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 200), st.sampled_from(["pair", "ref", "image"])),
                max_size=10),
       st.integers(0, 80), st.integers(0, 40), st.integers(0, 10))
def test_admission_with_reservations_never_overcommits(groups, free, reserved, running):
    """Whatever mix waits, what is admitted (with its reservations, less what was prepaid) fits the free
    blocks and sequence slots, and a pair is never split."""
    cands: list[Candidate] = []
    for i, (prompt, new, kind) in enumerate(groups):
        total = prompt + new
        if kind == "pair":
            cands += [Candidate(f"{i}/c", i, 2, prompt, total), Candidate(f"{i}/u", i, 2, prompt, total)]
        elif kind == "ref":
            cands.append(Candidate(f"{i}/c", i, 1, prompt, total, reserve_tokens=total))
        else:
            prepaid = blocks_for(total, BS)
            cands.append(Candidate(f"{i}/u", i, 1, prompt, total, prepaid_blocks=prepaid, prepaid_seqs=1))
    prepaid_total = sum(c.prepaid_blocks for c in cands)
    b = _budget(free=free + prepaid_total, reserved=reserved + prepaid_total, running=running)
    d = decide(cands, b)
    admitted = [c for c in cands if c.item in d.admit]
    blocks = sum(blocks_for(c.max_total_tokens, BS) + blocks_for(c.reserve_tokens, BS) - c.prepaid_blocks
                 for c in admitted)
    seqs = sum(1 + (c.reserve_tokens > 0) - c.prepaid_seqs for c in admitted)
    assert blocks <= max(0, free - reserved)
    assert seqs <= 16 - running
    halves = {c.group for c in admitted if c.group_size == 2}
    assert all(sum(1 for c in admitted if c.group == g) == 2 for g in halves)
    assert sorted(d.admit + d.hold + d.impossible) == sorted(c.item for c in cands)


# ---- the reference engine --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_tokenizer):
    from service.engine.reference import ReferenceEngine

    return ReferenceEngine(tiny_dir / "model", tiny_tokenizer)


def _plan(tok, task: str, mode: str, max_new: int = 160) -> GenerationRequest:
    return plan_request(tok, task, "how to make tea", [], GenerationOptions(
        size="64x64", text=GREEDY, image=GREEDY, max_new_tokens=max_new, uncond_mode=mode), f"{task}-{mode}")


def test_both_modes_agree_when_the_answer_opens_with_the_image(reference, tiny_tokenizer):
    lock, ref = (reference.generate_ids(_plan(tiny_tokenizer, "t2i", mode)) for mode in ("lockstep", "reference"))
    assert lock[0] == tiny_tokenizer.ids.boi and lock == ref


def test_reference_mode_feeds_the_uncond_branch_only_the_image_spans(reference, tiny_tokenizer, monkeypatch):
    """A howto answer (text, image, text, image, …): the uncond branch is run exactly at the pixel steps,
    each time on the uncond prompt plus the image spans written so far; the answers of the two modes
    part at the first pixel, which is where the release's two paths part too."""
    from service.engine.reference import engine as engine_module

    tok = tiny_tokenizer
    seen: list[list[int]] = []

    class Spy(engine_module._ImageOnlyUncond):  # type: ignore[name-defined]
        def __init__(self, engine, prompt):
            super().__init__(engine, prompt)
            self.fed = list(prompt)

        def append(self, token):
            super().append(token)
            self.fed.append(token)

        def logits(self):
            seen.append(list(self.fed))
            return super().logits()

    monkeypatch.setattr(engine_module, "_ImageOnlyUncond", Spy)
    req = _plan(tok, "howto", "reference")
    got = reference.generate_ids(req)
    kinds = [type(s).__name__ for s in parse(tok, got)]
    first_image = kinds.index("ImageSegment")
    assert "TextSegment" in kinds[:first_image] and kinds.count("ImageSegment") >= 2
    assert "TextSegment" in kinds[first_image:kinds.index("ImageSegment", first_image + 1)]

    spans = ImageSpans(SpanTokens.from_tokenizer(tok))
    want = []
    for t in got[:-1]:
        spans.feed(t)
        if spans.mode == 2:  # PIXELS: the next token is drawn in an image body
            want.append(list(req.uncond_prompt or []) + spans.tokens)
    assert seen == want
    pixels = sum(s.codes.size + s.codes.shape[0] for s in parse(tok, got) if isinstance(s, ImageSegment))
    assert len(seen) == pixels  # every body token of every image (pixels, EOLs and the EOI)

    lock = reference.generate_ids(_plan(tok, "howto", "lockstep"))
    first_pixel = got.index(tok.ids.img) + 1
    assert lock[:first_pixel] == got[:first_pixel] and lock != got
