"""The native engine's schedules on the tiny checkpoint: ``ar`` against the reference engine, ``jacobi``
against ``ar`` (greedy ids; sampled distribution by chi-square), ``zipar`` against a full-recompute
oracle and its pass formula, and batches that mix schedules and tasks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from service.engine.native.core import NativeCore, ids_of, run_requests
from service.engine.native.network import NativeNetwork, load_emu3_weights
from service.engine.native.oracle import zipar_greedy_pixels
from service.engine.native.schedule import Schedule, zipar_passes
from service.task import GenerationOptions, plan_request
from service.types import Decoding, GenerationRequest, SamplingSettings

GREEDY = SamplingSettings(1, 1.0, 1.0)
SAMPLED = SamplingSettings(5120, 1.0, 1.0)  # Emu3.5's image settings
AR, JACOBI = Decoding(), Decoding("jacobi", draft_len=4)


@pytest.fixture(scope="module")
def net(tiny_dir) -> NativeNetwork:
    config, weights = load_emu3_weights(tiny_dir / "model", torch.float32)
    return NativeNetwork(config, weights, [torch.device("cpu")], torch.float32)


@pytest.fixture(scope="module")
def net64(tiny_dir) -> NativeNetwork:
    """float64: batched and alone forwards then agree far below float32's resolution, so seeded sampled
    draws (over the tiny model's almost flat pixel distribution) compare bit for bit, as FlashAR's tests do."""
    config, weights = load_emu3_weights(tiny_dir / "model", torch.float64)
    return NativeNetwork(config, weights, [torch.device("cpu")], torch.float64)


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_tokenizer):
    from service.engine.reference import ReferenceEngine

    return ReferenceEngine(tiny_dir / "model", tiny_tokenizer)  # float32: ids equal to the bit


#: Enough for text, an image and text again (the tiny howto answer opens its first image at token 35).
MAX_NEW = {"howto": 80, "story": 70}


def _plan(tok, task: str, decoding: Decoding = AR, sampling: SamplingSettings = GREEDY, seed: int | None = None,
          uncond: str = "lockstep", size: str = "64x64", refs: int = 1, max_new: int = 0, rid: str = "") -> GenerationRequest:
    max_new = max_new or MAX_NEW.get(task, 300)
    grids = [np.full((3 + i, 4), 7 + i, dtype=np.int64) for i in range(refs)] if task == "x2i" else []
    req = plan_request(tok, task, "how to make tea", grids, GenerationOptions(
        size=size, text=sampling, image=sampling, max_new_tokens=max_new, uncond_mode=uncond, seed=seed),
        rid or f"{task}-{decoding.mode}")
    return replace(req, decoding=decoding)


def _ids(net, tok, req: GenerationRequest, slots: int = 4) -> tuple[list[int], int]:
    core = NativeCore(net, tok, slots, fallback_seed=0)
    deltas = run_requests(core, [req])[req.request_id]
    assert sum(d.steps for d in deltas) == core.forwards  # decode_steps account for every pass
    return ids_of(deltas), core.forwards


# ---- ar = the reference engine -------------------------------------------------------------------------
@pytest.mark.parametrize("task,uncond,refs,seed", [
    ("t2i", "lockstep", 0, None), ("t2i", "lockstep", 0, 7), ("x2i", "lockstep", 1, None), ("x2i", "reference", 3, 7),
    ("howto", "reference", 0, None), ("howto", "lockstep", 0, 7)])
def test_ar_ids_equal_the_reference_engine(net, reference, tiny_tokenizer, task, uncond, refs, seed):
    req = _plan(tiny_tokenizer, task, AR, SAMPLED if seed is not None else GREEDY, seed, uncond, refs=refs)
    ids, passes = _ids(net, tiny_tokenizer, req)
    assert ids == reference.generate_ids(req)
    assert passes == len(ids)  # one token per pass
    assert tiny_tokenizer.ids.img in ids


# ---- jacobi: lossless ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task,uncond", [("t2i", "lockstep"), ("x2i", "lockstep"), ("howto", "lockstep"),
                                         ("howto", "reference"), ("story", "lockstep")])
def test_jacobi_greedy_ids_equal_ar_in_fewer_passes(net, tiny_tokenizer, task, uncond):
    tok = tiny_tokenizer
    size = "96x160" if task in ("t2i", "x2i") else "64x64"
    want, ar_passes = _ids(net, tok, _plan(tok, task, AR, uncond=uncond, size=size))
    for draft_len in ((2, 16) if task == "t2i" else (16,)):
        got, passes = _ids(net, tok, _plan(tok, task, Decoding("jacobi", draft_len=draft_len), uncond=uncond,
                                           size=size))
        assert got == want
        assert passes < ar_passes


SEEDS = 100


def _images(net, tok, decoding: Decoding, first_seed: int) -> list[tuple[int, ...]]:
    """The 1×3 images (top-k 2: 8 possible ones) of ``SEEDS`` seeded requests, batched together."""
    sampling = SamplingSettings(2, 1.0, 1.0)
    reqs = [replace(_plan(tok, "t2i", decoding, sampling, seed=s, size="48x16", rid=f"r{s}"), cfg_scale=1.0)
            for s in range(first_seed, first_seed + SEEDS)]
    core = NativeCore(net, tok, SEEDS, fallback_seed=0)
    return [tuple(ids_of(d)[-4:-1]) for d in run_requests(core, reqs).values()]


@pytest.fixture(scope="module")
def ar_images(net, tiny_tokenizer) -> list[tuple[int, ...]]:
    return _images(net, tiny_tokenizer, AR, 10_000)


def _distribution_test(net, tok, decoding: Decoding, ar_images) -> float:
    """p-value of a chi-square test (homogeneity, two samples) that ``decoding``'s images follow the
    distribution of ``ar``'s (other seeds: the samples are independent)."""
    counts = [ar_images, _images(net, tok, decoding, 0)]
    keys = sorted(set(counts[0]) | set(counts[1]))
    table = torch.tensor([[float(c.count(k)) for k in keys] for c in counts])
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = len(keys) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), stat / 2)) if dof > 0 else 1.0


def test_jacobi_sampling_keeps_ars_distribution(net, tiny_tokenizer, ar_images):
    assert _distribution_test(net, tiny_tokenizer, Decoding("jacobi", draft_len=3), ar_images) > 0.001


def test_a_broken_acceptance_rule_fails_the_distribution_test(net, tiny_tokenizer, ar_images, monkeypatch):
    """Keeping every draft (no ``min(1, p/q)`` test) draws later tokens from the stale proposals."""
    import service.engine.native.core as core_module

    monkeypatch.setattr(core_module, "accept", lambda p, drafts, q_d, u: torch.ones_like(drafts, dtype=torch.bool))
    assert _distribution_test(net, tiny_tokenizer, Decoding("jacobi", draft_len=3), ar_images) < 0.001


# ---- zipar ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,size,decodings", [
    ("t2i", "64x64", (Decoding("zipar", window=4), Decoding("zipar", draft_len=4, window=4096))),
    ("howto", "64x64", (Decoding("zipar", window=4),))])
def test_zipar_with_a_window_of_the_row_width_is_ar(net, tiny_tokenizer, task, size, decodings):
    tok = tiny_tokenizer
    want, _ = _ids(net, tok, _plan(tok, task, AR, size=size))
    for dec in decodings:
        assert _ids(net, tok, _plan(tok, task, dec, size=size))[0] == want


@pytest.mark.parametrize("window,guided", [(1, False), (2, True), (5, True)])
def test_zipar_equals_a_full_recompute_oracle_and_its_pass_formula(net, tiny_tokenizer, window, guided):
    tok = tiny_tokenizer
    req = _plan(tok, "t2i", Decoding("zipar", window=window), size="96x160")  # a 10×6 grid
    if not guided:
        req = replace(req, cfg_scale=1.0)
    ids, passes = _ids(net, tok, req)
    grid = req.target_grid
    assert grid == (10, 6)
    header = ids.index(tok.ids.img) + 1
    assert passes == header + zipar_passes(*grid, window)
    body = ids[header:]
    pixels = [t for i, t in enumerate(body[:-1]) if i % 7 != 6]
    core = NativeCore(net, tok, 2)
    prompts = [req.cond_prompt] + ([req.uncond_prompt] if req.guided else [])
    assert zipar_greedy_pixels(net, core.tables, prompts, ids, grid, window, req.cfg_scale) == pixels
    ar_ids, _ = _ids(net, tok, replace(req, decoding=AR))
    assert ids != ar_ids and len(ids) == len(ar_ids)  # approximate: a different image, the same layout


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 16))
def test_lanes_cover_the_body_and_zipars_opening_rule_takes_the_formulas_passes(height, width, window):
    """Lanes partition every body offset except row ends and EOI (jacobi: one lane, row ends inside);
    simulating ZipAR's opening rule one token per open row per pass gives :func:`zipar_passes`."""
    from service.engine.native.schedule import body_len, is_row_end, lanes_for, may_open

    zipar = lanes_for(Schedule.of(Decoding("zipar", window=window)), height, width)
    covered = sorted(o for lane in zipar for o in range(lane.start, lane.end))
    assert covered == [o for o in range(body_len(height, width)) if not is_row_end(o, width)]
    (jacobi,) = lanes_for(Schedule.of(Decoding("jacobi")), height, width)
    assert (jacobi.start, jacobi.end) == (0, body_len(height, width) - 1)
    passes = 0
    while not all(lane.done for lane in zipar):
        opened = [lane for i, lane in enumerate(zipar) if not lane.done
                  and (lane.next > lane.start or may_open(zipar, i, window))]
        for lane in opened:
            lane.next += 1
        passes += 1
    assert passes == zipar_passes(height, width, window)


def test_zipar_passes_on_the_real_grid():
    assert zipar_passes(55, 73, Schedule.of(Decoding("zipar")).window) + 7 <= 1000
    assert zipar_passes(55, 73, 73) == 55 * 73 and zipar_passes(4, 4, 1) == 7


# ---- batches ---------------------------------------------------------------------------------------------
def test_a_batch_mixing_schedules_and_tasks_gives_each_requests_ids_alone(net64, tiny_tokenizer):
    tok, net = tiny_tokenizer, net64
    wide = SamplingSettings(8000, 1.0, 1.0)  # a larger top-k than the others': the batch's window grows
    reqs = [_plan(tok, "t2i", AR, wide, seed=2, rid="a"), _plan(tok, "howto", JACOBI, uncond="reference", max_new=50, rid="b"),
            _plan(tok, "x2i", Decoding("zipar", window=2), wide, seed=5, refs=2, rid="c"),
            _plan(tok, "t2i", Decoding("zipar", draft_len=3, window=2), wide, seed=6, rid="d"),
            _plan(tok, "t2i", JACOBI, SAMPLED, seed=3, rid="e"),
            _plan(tok, "story", Decoding("zipar", window=3), SAMPLED, seed=4, max_new=40, rid="f")]
    alone = {r.request_id: _ids(net, tok, r)[0] for r in reqs}
    core = NativeCore(net, tok, 12, fallback_seed=1)
    batched = {k: ids_of(v) for k, v in run_requests(core, reqs, join_every=3).items()}
    assert batched == alone
    assert core.forwards < sum(len(v) for v in alone.values())


# ---- devices and the engine API ----------------------------------------------------------------------------
def test_layers_split_across_devices_give_the_same_ids(net, tiny_dir, tiny_tokenizer):
    config, weights = load_emu3_weights(tiny_dir / "model", torch.float32)
    split = NativeNetwork(config, weights, [torch.device("cpu"), torch.device("cpu", 0)], torch.float32)
    assert split.layers[0].device != split.layers[-1].device  # one run of layers per device
    req = _plan(tiny_tokenizer, "t2i", Decoding("zipar", draft_len=3, window=2))
    assert _ids(split, tiny_tokenizer, req) == _ids(net, tiny_tokenizer, req)


def test_async_engine_serves_mixed_schedules_together_and_aborts_cleanly(net, tiny_dir, tiny_tokenizer):
    import asyncio

    from service.engine.native import AsyncNativeEngine

    tok = tiny_tokenizer
    engine = AsyncNativeEngine(tiny_dir / "model", tok, "cpu", "float32", max_model_len=4096, max_slots=6)
    assert engine.schedules == ("ar", "jacobi", "zipar")
    engine.start()
    reqs = [_plan(tok, "t2i", AR, rid="a"), _plan(tok, "t2i", JACOBI, rid="b"),
            _plan(tok, "t2i", Decoding("zipar", window=2), rid="c")]

    async def collect(req):
        engine.check(req)
        steps, ids = 0, []
        async for d in engine.generate(req):
            steps += d.steps
            ids += d.token_ids
        return steps, ids

    async def go():
        together = await asyncio.gather(*(collect(r) for r in reqs))
        stream = engine.generate(_plan(tok, "howto", JACOBI, rid="cut"))
        await stream.__anext__()
        await stream.aclose()  # a client went away: its rows are released
        for _ in range(100):
            if engine._core is not None and len(engine._core.free) == 6:
                break
            await asyncio.sleep(0.05)
        return together

    try:
        together = asyncio.run(go())
        assert engine.stats().peak_running_sequences == 6  # three guided requests, one forward
        assert engine._core is not None and len(engine._core.free) == 6
    finally:
        engine.shutdown()
    for req, (steps, ids) in zip(reqs, together):
        want, passes = _ids(net, tok, req)
        assert ids == want and steps == passes
    assert together[1][0] < together[0][0] and together[2][0] < together[0][0]
