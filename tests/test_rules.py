"""Emu3.5 decoding rules on small hand-made vocabularies: masks, forced tokens, CFG and sampling."""

from __future__ import annotations

import math

import pytest
import torch

from service.engine.policy.rules import (
    CAT_ANY,
    CAT_DIGIT,
    CAT_NONZERO_DIGIT,
    CAT_TEXT,
    CAT_VISUAL,
    HEADER,
    PIXELS,
    TEXT,
    Guidance,
    RowState,
    SamplingColumns,
    VocabTables,
    advance,
    constraints,
    guide_,
    host_mode,
    mask_,
    next_tokens,
    sample,
    sampling_columns,
)

# A 20-token vocabulary: '0'..'9' = 0..9, '*' = 10, BOI 11, IMG 12, EOI 13, EOL 14, text 15, 16,
# visual codes 0..2 = 17..19.
STAR, BOI, IMG, EOI, EOL, T1, T2, V0, V1, V2 = 10, 11, 12, 13, 14, 15, 16, 17, 18, 19
NEG = float("-inf")


@pytest.fixture()
def tables() -> VocabTables:
    return VocabTables.build(vocab_size=20, first_visual=17, boi=BOI, img=IMG, eoi=EOI, eol=EOL,
                             star=STAR, digit_ids=range(10))


def feed(state: RowState, tables: VocabTables, tokens: list[int]) -> None:
    for t in tokens:
        advance(state, torch.tensor([t]), tables)


def next_rule(state: RowState, tables: VocabTables) -> tuple[int, int]:
    cat, forced = constraints(state, tables)
    return int(cat[0]), int(forced[0])


def test_forced_header_rows_and_end(tables):
    state = RowState.empty(1)
    state.reset_rows(0, fixed_h=2, fixed_w=12)
    assert next_rule(state, tables) == (CAT_TEXT, -1)
    feed(state, tables, [T1, BOI])
    expected_header = [2, STAR, 1, 2, IMG]
    for tok in expected_header:
        assert next_rule(state, tables)[1] == tok
        feed(state, tables, [tok])
    assert int(state.mode[0]) == PIXELS
    # 2 rows of 12: 12 visual, EOL, 12 visual, EOI (no EOL after the last row)
    for row in range(2):
        for _ in range(12):
            assert next_rule(state, tables) == (CAT_VISUAL, -1)
            feed(state, tables, [V1])
        want = EOL if row == 0 else EOI
        assert next_rule(state, tables)[1] == want
        feed(state, tables, [want])
    assert int(state.mode[0]) == TEXT
    assert next_rule(state, tables) == (CAT_TEXT, -1)


def test_free_header_is_constrained_then_reused(tables):
    state = RowState.empty(1)
    feed(state, tables, [BOI])
    want = [(CAT_NONZERO_DIGIT, -1), (CAT_DIGIT, -1), (CAT_TEXT, STAR), (CAT_NONZERO_DIGIT, -1), (CAT_DIGIT, -1),
            (CAT_TEXT, IMG)]
    written = [1, 0, STAR, 1, 1, IMG]  # 10 x 11
    for (cat, forced), tok in zip(want, written):
        got_cat, got_forced = next_rule(state, tables)
        assert got_forced == forced
        if forced < 0:
            assert got_cat == cat
        feed(state, tables, [tok])
    assert (int(state.img_h[0]), int(state.img_w[0])) == (10, 11)
    feed(state, tables, ([V0] * 11 + [EOL]) * 9 + [V0] * 11 + [EOI])
    assert int(state.mode[0]) == TEXT
    # a second image of the same answer repeats the first header
    feed(state, tables, [T2, BOI])
    forced = []
    for _ in range(6):
        f = next_rule(state, tables)[1]
        forced.append(f)
        feed(state, tables, [f])
    assert forced == [1, 0, STAR, 1, 1, IMG]


def test_masks(tables):
    logits = torch.zeros(5, 20)
    cat = torch.tensor([CAT_TEXT, CAT_VISUAL, CAT_NONZERO_DIGIT, CAT_DIGIT, CAT_ANY])
    mask_(logits, cat, tables)
    finite = torch.isfinite(logits)
    assert finite[0].nonzero().flatten().tolist() == list(range(17))
    assert finite[1].nonzero().flatten().tolist() == [V0, V1, V2]
    assert finite[2].nonzero().flatten().tolist() == list(range(1, 10))
    assert finite[3].nonzero().flatten().tolist() == list(range(10))
    assert finite[4].all()  # a row the rules do not manage is left alone


def _guided(cond, uncond, scale, visual=True):
    logits = torch.tensor([cond, uncond])
    g = Guidance(torch.tensor([0]), torch.tensor([1]), torch.tensor([scale]))
    guide_(logits, g, torch.tensor([visual, visual]))
    return logits


def test_cfg_matches_the_log_probability_form_up_to_a_row_constant():
    cond, uncond = [1.0, 2.0, 3.0], [0.5, 0.5, 0.0]
    out = _guided(cond, uncond, 3.0)

    def lsm(xs):
        m = math.log(sum(math.exp(x) for x in xs))
        return [x - m for x in xs]

    c, u = lsm(cond), lsm(uncond)
    want = [u_i + 3.0 * (c_i - u_i) for c_i, u_i in zip(c, u)]  # design.md §5, by hand
    shift = out[0, 0].item() - want[0]
    assert [x - shift for x in out[0].tolist()] == pytest.approx(want, abs=1e-5)
    assert torch.softmax(out[0], -1).tolist() == pytest.approx(torch.softmax(torch.tensor(want), -1).tolist(), abs=1e-6)
    assert out[1].tolist() == uncond  # the uncond row is not changed
    # not drawing a pixel, or scale 1: bit-for-bit unchanged
    assert _guided(cond, uncond, 3.0, visual=False)[0].tolist() == cond
    assert _guided(cond, uncond, 1.0)[0].tolist() == cond


def test_sample_greedy_topk_topp():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [0.0, 5.0, 1.0, 4.0], [3.0, 0.0, NEG, 2.9]])
    greedy = sample(logits, torch.tensor([1, 0, 0]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]), 4)
    assert greedy.tolist() == [1, 1, 0]
    # top_k 2 never yields anything but the two best tokens
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        t = sample(logits[:1], torch.tensor([2]), torch.tensor([1.0]), torch.tensor([5.0]), 4, [g], [4])
        seen.add(int(t))
    assert seen == {1, 3}
    # top_p small keeps only the most likely token
    for _ in range(50):
        t = sample(logits[:1], torch.tensor([0]), torch.tensor([0.1]), torch.tensor([1.0]), 4, [g], [4])
        assert int(t) == 1


def test_sample_seed_reproducible_whatever_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    def run(seed, rows):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(20):
            t = sample(logits[:rows], torch.full((rows,), 10), torch.full((rows,), 0.95), torch.ones(rows), 10 * rows,
                       [g] + [None] * (rows - 1), [10] * rows)
            out.append(int(t[0]))
        return out
    assert run(7, 1) == run(7, 3)
    assert run(7, 1) != run(8, 1)


def test_stray_img_eol_eoi_in_text_do_not_switch_modes(tables):
    """Image mode is entered only through BOI → header → IMG, on the device and in the host mirror."""
    state = RowState.empty(1)
    mode = TEXT
    for t in (IMG, EOL, EOI, T1, IMG):
        feed(state, tables, [t])
        mode = host_mode(mode, t, tables)
        assert int(state.mode[0]) == mode == TEXT
        assert next_rule(state, tables) == (CAT_TEXT, -1)
    for t, want in ((BOI, HEADER), (1, HEADER), (STAR, HEADER), (1, HEADER), (IMG, PIXELS), (V0, PIXELS),
                    (EOI, TEXT)):
        feed(state, tables, [t])
        mode = host_mode(mode, t, tables)
        assert int(state.mode[0]) == mode == want, t


def test_a_stray_img_never_leads_to_a_visual_token(tables):
    """What the engines do each step: columns from the host mirror, then next_tokens. After a stray
    IMG the largest logit is visual, yet the token is text."""
    state, mode = RowState.empty(1), TEXT
    for t in (T1, IMG):
        feed(state, tables, [t])
        mode = host_mode(mode, t, tables)
    logits = torch.zeros(1, 20)
    logits[0, V1] = 9.0
    logits[0, T2] = 1.0
    one = lambda x: torch.tensor([x])  # noqa: E731
    cols = SamplingColumns(one(1), one(1.0), one(1.0))
    token = next_tokens(logits, state, tables, None, cols, cols, 1,
                        columns=sampling_columns([mode == PIXELS], tables))
    assert int(token) == T2


def test_top_k_keeps_every_logit_tied_with_the_kth():
    """As in the release: top-k 2 over [5, 3, 3, 3, 1] keeps the 5 and all three 3s, never the 1."""
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(400):
        t = sample(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([50.0]), 2, [g], [2])
        seen.add(int(t))
    assert seen == {0, 1, 2, 3}
    # a batch: each row its own k, ties judged against its own k-th value
    batch = torch.tensor([[4.0, 4.0, 4.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    seen_rows: list[set[int]] = [set(), set()]
    for _ in range(300):
        t = sample(batch, torch.tensor([1, 2]), torch.ones(2), torch.tensor([1.0, 50.0]), 2)
        seen_rows[0].add(int(t[0]))
        seen_rows[1].add(int(t[1]))
    assert seen_rows[1] == {0, 1}
    assert seen_rows[0] <= {0, 1, 2}  # top-k 1 is greedy: one of the tied maxima
