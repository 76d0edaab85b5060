"""The FlashAR engine against its oracle (full recomputation under the 4-D mask), its schedule, fusion,
batching and the strict loader; all on the tiny FlashAR checkpoint (``make-tiny --flashar``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from service.engine.flashar.checkpoint import check_flashar_checkpoint, is_flashar_checkpoint, load_flashar_weights
from service.engine.flashar.engine import FlashARCore, flashar_header, flashar_uncond, run_jobs
from service.engine.flashar.fusion import corner_logits, fused_logits
from service.engine.flashar.network import FlashARNetwork
from service.engine.flashar.oracle import OracleCore
from service.engine.flashar.schedule import diagonal_cells, num_steps
from service.lm_checkpoint import CheckpointError
from service.token_layout import StreamParser
from service.types import GenerationRequest, SamplingSettings

GREEDY = SamplingSettings(top_k=1, top_p=1.0, temperature=1.0)
SAMPLED = SamplingSettings(top_k=5120, top_p=1.0, temperature=1.0)  # Emu3.5's image settings


@pytest.fixture(scope="module")
def flashar_dir(tiny_dir) -> Path:
    from service.tiny.make import ensure_tiny_flashar

    return ensure_tiny_flashar(tiny_dir)


@pytest.fixture(scope="module")
def net(flashar_dir) -> FlashARNetwork:
    """The tiny FlashAR network in float64: the cached and the full forms then agree far below float32's
    resolution, so even sampled draws (the sampler works on float32 logits) are comparable bit for bit.
    (In float32 the tiny model's nearly flat pixel distribution lets a 1e-7 difference flip a draw.)"""
    cfg, weights = load_flashar_weights(flashar_dir, dtype=torch.float64)
    return FlashARNetwork(cfg, weights, [torch.device("cpu")], torch.float64)


def _request(tok, rid: str, grid: tuple[int, int], cfg: float = 5.0, sampling: SamplingSettings = GREEDY,
             seed: int | None = None, words: str = "a cat") -> GenerationRequest:
    cond = [tok.ids.bos, *tok.encode(f"You are a helpful assistant for t2i task. USER: {words} ASSISTANT: ",
                                     allow_special=False), tok.ids.bss]
    return GenerationRequest(rid, cond, [tok.ids.bos], cfg, sampling, sampling, 100_000, (tok.ids.eoi,), grid, seed)


def _jobs(core, tok, requests):
    return [core.make_job(r, flashar_header(tok, *r.target_grid), flashar_uncond(tok), tok.ids.eol, tok.ids.eoi)
            for r in requests]


def _decode(core, tok, requests, join_every: int = 0) -> dict[str, list[int]]:
    return run_jobs(core, _jobs(core, tok, requests), join_every)


# ---- schedule ----------------------------------------------------------------------------------------
@given(st.integers(1, 12), st.integers(1, 12))
def test_diagonals_partition_the_grid_in_h_plus_w_minus_1_steps(h, w):
    steps = [diagonal_cells(s, h, w) for s in range(num_steps(h, w))]
    cells = [c for step in steps for c in step]
    assert sorted(cells) == [(r, c) for r in range(h) for c in range(w)]
    for s, step in enumerate(steps):
        assert all(r + c == s for r, c in step) and [r for r, _ in step] == sorted(r for r, _ in step)
        assert len(step) == min(s + 1, h, w, h + w - 1 - s)


def test_32x32_takes_63_forwards_and_streams_emu35s_layout(net, tiny_tokenizer):
    tok = tiny_tokenizer
    core = FlashARCore(net, slots=2, fallback_seed=0)
    (ids,) = _decode(core, tok, [_request(tok, "a", (32, 32), cfg=1.0)]).values()
    assert core.forwards == 63  # the prefill draws (0, 0), then one forward per further diagonal
    parser = StreamParser(tok)
    events = parser.feed(ids)
    assert ids[:7] == flashar_header(tok, 32, 32) and ids[-1] == tok.ids.eoi
    assert len(ids) == 7 + 32 * 33
    body = ids[7:]
    assert all(body[r * 33 + 32] == tok.ids.eol for r in range(31))
    grid = [t for i, t in enumerate(body[:-1]) if i % 33 != 32]
    assert all(tok.ids.first_visual <= t < tok.vocab_size for t in grid)
    assert any(type(e).__name__ == "ImageDone" for e in events)


# ---- the oracle ---------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grids=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
       guided=st.booleans(), sampled=st.booleans(), join_every=st.sampled_from([0, 1, 2]))
def test_cached_engine_equals_full_recompute_oracle(net, tiny_tokenizer, grids, guided, sampled, join_every):
    """Greedy and seeded-sampled ids equal the oracle's, with and without CFG, alone and batched (requests
    joining at different diagonals)."""
    tok = tiny_tokenizer
    reqs = [_request(tok, f"r{i}", g, cfg=5.0 if guided else 1.0, sampling=SAMPLED if sampled else GREEDY,
                     seed=100 + i if sampled else None, words="a cat " + "x " * i) for i, g in enumerate(grids)]
    fast = _decode(FlashARCore(net, slots=8, fallback_seed=0), tok, reqs, join_every)
    oracle = _decode(OracleCore(net, slots=8, fallback_seed=0), tok, reqs)
    assert fast == oracle


def test_greedy_batch_of_4_equals_each_request_alone(net, tiny_tokenizer):
    tok = tiny_tokenizer
    reqs = [_request(tok, f"r{i}", g, words=w) for i, (g, w) in
            enumerate([((4, 4), "a dog"), ((3, 6), "a red car on a street"), ((5, 2), "the moon"), ((4, 4), "a")])]
    batched = _decode(FlashARCore(net, slots=8, fallback_seed=0), tok, reqs, join_every=2)
    alone = {k: v for r in reqs for k, v in _decode(FlashARCore(net, slots=2, fallback_seed=0), tok, [r]).items()}
    assert batched == alone
    assert len({tuple(v) for v in alone.values()}) == 4  # the prompts matter: four different images


def test_a_small_grid_with_a_long_prompt_batched_with_a_large_grid(net, tiny_tokenizer):
    """Chunks are padded to the batch's longest diagonal: a row whose own needs are small still gets room."""
    tok = tiny_tokenizer
    reqs = [_request(tok, "big", (6, 6), words="a"), _request(tok, "small", (1, 2), words="a cat " * 30)]
    core = FlashARCore(net, slots=4, fallback_seed=0)
    batched = _decode(core, tok, reqs, join_every=3)
    assert batched == _decode(OracleCore(net, slots=4, fallback_seed=0), tok, reqs)


def test_guidance_changes_ids_and_scale_1_equals_cond_only(net, tiny_tokenizer):
    tok = tiny_tokenizer
    plain = _decode(FlashARCore(net, slots=2, fallback_seed=0), tok, [_request(tok, "a", (4, 4), cfg=1.0)])
    guided = _decode(FlashARCore(net, slots=2, fallback_seed=0), tok, [_request(tok, "a", (4, 4), cfg=5.0)])
    assert plain != guided
    no_uncond = _request(tok, "a", (4, 4), cfg=5.0)
    core = FlashARCore(net, slots=2, fallback_seed=0)
    (job,) = core.make_job(no_uncond, flashar_header(tok, 4, 4), None, tok.ids.eol, tok.ids.eoi),
    assert run_jobs(core, [job]) == plain


# ---- fusion ---------------------------------------------------------------------------------------------
def test_fusion_row0_col0_interior_and_corner(net):
    torch.manual_seed(0)
    d = net.cfg.hidden_size
    h_h, h_v = torch.randn(3, d, dtype=torch.float64), torch.randn(3, d, dtype=torch.float64)
    left, up = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 2])
    has_left, has_up = torch.tensor([True, False, True]), torch.tensor([False, True, True])
    z = fused_logits(net, h_h, h_v, left, up, has_left, has_up)
    close = dict(rtol=1e-5, atol=1e-6)
    assert torch.allclose(z[0], net.horizontal_logits(h_h[0]), **close)  # row 0: the left cell's horizontal head
    assert torch.allclose(z[1], net.vertical_logits(h_v[2]), **close)  # column 0: the upper cell's vertical head
    assert not torch.allclose(z[0], net.vertical_logits(h_v[0]), **close)
    g = net.interior_gate(h_h[1], h_v[2])
    assert 0 < float(g) < 1
    assert torch.allclose(z[2], g * net.horizontal_logits(h_h[1]) + (1 - g) * net.vertical_logits(h_v[2]), **close)
    pre_h, pre_b = torch.randn(1, d, dtype=torch.float64), torch.randn(1, d, dtype=torch.float64)
    g0 = net.corner_gate(pre_h)
    assert torch.allclose(corner_logits(net, pre_h, pre_b),
                          g0 * net.horizontal_logits(pre_h) + (1 - g0) * net.vertical_logits(pre_b), **close)


def test_proximity_mask_later_diagonals_do_not_change_earlier_features(net, tiny_tokenizer):
    """Changing cell (2, 2) (diagonal 4) of a 3×3 grid leaves every feature of diagonals 0…3 as it was, in
    the backbone and the vertical branch, and changes its own."""
    tok = tiny_tokenizer
    prompt = [tok.ids.bos, *tok.encode("a cat", allow_special=False)] + flashar_header(tok, 3, 3)
    p = len(prompt)
    base = torch.tensor([prompt + [tok.ids.first_visual + i for i in range(9)]])
    changed = base.clone()
    changed[0, p + 8] += 5
    valid = torch.ones(1, p, dtype=torch.bool)
    (h_a, x_a, v_a), (h_b, x_b, v_b) = net.full(base, valid, (3, 3)), net.full(changed, valid, (3, 3))
    early = torch.tensor([q for q in range(9) if q // 3 + q % 3 < 4])
    assert torch.equal(h_a[0, p:][early], h_b[0, p:][early]) and torch.equal(x_a[0, p:][early], x_b[0, p:][early])
    assert torch.equal(v_a[0][early], v_b[0][early])
    assert not torch.equal(h_a[0, p + 8], h_b[0, p + 8]) and not torch.equal(v_a[0, 8], v_b[0, 8])


# ---- the loader -----------------------------------------------------------------------------------------
def test_loader_recognises_flashar_and_refuses_bad_tensors(flashar_dir, tiny_dir, tmp_path):
    assert is_flashar_checkpoint(flashar_dir) and not is_flashar_checkpoint(tiny_dir / "model")
    cfg, where = check_flashar_checkpoint(flashar_dir)
    assert cfg.vertical_layers == 1 and len(where) == len(cfg.expected_shapes())
    state = load_file(str(flashar_dir / "model.safetensors"))

    def variant(name: str, change) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(flashar_dir / "config.json", folder / "config.json")
        save_file(change(dict(state)), str(folder / "model.safetensors"))
        return folder

    cases = {
        "missing": (lambda s: {k: v for k, v in s.items() if k != "hv_gate_corner.bias"}, "hv_gate_corner.bias"),
        "extra": (lambda s: {**s, "lm_head.weight": s["horizontal_head.weight"].clone()}, "lm_head.weight"),
        "shape": (lambda s: {**s, "vertical_norm.weight": torch.ones(3)}, "vertical_norm.weight"),
        "depth": (lambda s: {**s, **{k.replace("vertical_block.0.", "vertical_block.1."): v.clone() for k, v in s.items()
                                     if k.startswith("vertical_block.0.")}}, "vertical_block.1."),
    }
    for name, (change, tensor) in cases.items():
        with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.")):
            check_flashar_checkpoint(variant(name, change))
    legacy = variant("legacy", lambda s: {**s, "fuse_h_logit": torch.zeros(1)})
    check_flashar_checkpoint(legacy)  # the release's legacy keys are ignored
    raw = json.loads((flashar_dir / "config.json").read_text())
    assert raw["model_type"] == "emu3_flashar" and raw["vertical_start_layer"] == 1


# ---- placement and the async engine --------------------------------------------------------------------
def test_layers_split_over_two_devices_give_the_same_ids(flashar_dir, net, tiny_tokenizer):
    tok = tiny_tokenizer
    cfg, weights = load_flashar_weights(flashar_dir, dtype=torch.float64)
    split = FlashARNetwork(cfg, weights, [torch.device("cpu"), torch.device("cpu", 0)], torch.float64)
    assert split.layers[0].device != split.layers[-1].device  # one run of layers per device
    reqs = [_request(tok, "a", (3, 4)), _request(tok, "b", (4, 3), words="a dog")]
    assert _decode(FlashARCore(split, 4, 0), tok, reqs) == _decode(FlashARCore(net, 4, 0), tok, reqs)


@pytest.mark.slow
def test_async_engine_runs_four_requests_in_shared_forwards_and_aborts_cleanly(flashar_dir, tiny_tokenizer):
    import asyncio

    from service.engine.flashar.async_engine import AsyncFlashAREngine

    tok = tiny_tokenizer
    engine = AsyncFlashAREngine(flashar_dir, tok, "cpu", "float64", max_model_len=4096, max_concurrent=4)
    engine.start()
    reqs = [_request(tok, f"r{i}", (6, 6), words="a cat " + "x " * i) for i in range(4)]

    async def collect(req):
        steps, ids = 0, []
        async for d in engine.generate(req):
            steps += d.steps
            ids += d.token_ids
        return steps, ids

    async def go():
        together = await asyncio.gather(*(collect(r) for r in reqs))
        stream = engine.generate(_request(tok, "cut", (6, 6)))
        await stream.__anext__()
        await stream.aclose()  # a client went away: its rows are released
        for _ in range(100):
            if len(engine._core.free) == 8:
                break
            await asyncio.sleep(0.05)
        return together

    try:
        together = asyncio.run(go())
        assert engine.stats().peak_running_sequences == 8  # four guided requests, one forward
        assert len(engine._core.free) == 8
    finally:
        engine.shutdown()
    assert [s for s, _ in together] == [11] * 4  # 6 + 6 − 1 forwards each
    cfg, weights = load_flashar_weights(flashar_dir, dtype=torch.float64)
    alone_net = FlashARNetwork(cfg, weights, [torch.device("cpu")], torch.float64)
    for req, (_, ids) in zip(reqs, together):
        assert ids == _decode(FlashARCore(alone_net, 2, 0), tok, [req])[req.request_id]
