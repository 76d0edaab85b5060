"""IBQ vision tokenizer: checkpoint loading, network layout, chunked quantiser, codec, resize, devices."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.tiny.vq import TINY_VQ_CONFIG, make_tiny_vq
from service.vq import (
    CheckpointError,
    ConfigError,
    DeviceError,
    StateDictMismatchError,
    VisionTokenizer,
    grid_size,
    nearest_codes,
    reference_image_size,
    resolve_device,
    resolve_dtype,
)
from service.vq.checkpoint import load_config, load_state_dict, parse_config, save_checkpoint
from service.vq.network import AttnBlock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_vq(tmp_path_factory.mktemp("tiny_vq"), seed=0)


@pytest.fixture(scope="session")
def tok(tiny_dir) -> VisionTokenizer:
    return VisionTokenizer.from_pretrained(tiny_dir, device="cpu")


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _raw_config() -> dict:
    return yaml.safe_load(yaml.safe_dump(TINY_VQ_CONFIG))


# ---------------------------------------------------------------- checkpoint format and strictness


def test_tiny_checkpoint_layout(tiny_dir):
    raw = torch.load(tiny_dir / "model.ckpt", weights_only=True)
    assert set(raw) == {"state_dict"}  # the tiny one is written wrapped
    sd = raw["state_dict"]
    assert sd["quantize.embedding.weight"].shape == (131072, 256)  # the real codebook: size and width
    assert sd["quant_conv.weight"].shape == (256, 256, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (256, 256, 1, 1)
    for key in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.1.block.0.conv2.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",  # 32 -> 64 channels
        "encoder.down.3.downsample.conv.weight",
        "encoder.down.4.attn.0.proj_out.weight",  # nominal res 256/16 = 16 is in attn_resolutions
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.block_2.norm2.bias",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.mid.attn_1.k.weight",
        "decoder.up.0.block.1.conv1.weight",  # num_res_blocks + 1 = 2 blocks per decoder level
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.4.attn.1.v.weight",
        "decoder.up.3.block.0.nin_shortcut.weight",  # 128 -> 64 channels
        "decoder.norm_out.weight",
        "decoder.conv_out.weight",
    ):
        assert key in sd, key
    assert "encoder.down.4.downsample.conv.weight" not in sd  # no downsample after the last level
    assert "decoder.up.0.upsample.conv.weight" not in sd  # no upsample at level 0
    assert not any(k.startswith("encoder.down.3.attn") for k in sd)
    assert sd["encoder.conv_out.weight"].shape[0] == 256  # double_z false -> z_channels
    assert sd["decoder.up.4.block.0.conv1.weight"].shape == (128, 128, 3, 3)
    assert sd["decoder.up.0.block.0.conv1.weight"].shape == (32, 32, 3, 3)
    cfg = load_config(tiny_dir)
    assert cfg.ddconfig.downsample == 16
    assert "use_entropy_loss" in cfg.ignored and "beta" in cfg.ignored


def test_tiny_runs_in_code_that_assumes_the_real_widths_and_flags(tiny_dir, tok):
    """The release decodes with ``embed(codes).view(1, h, w, 256)`` and builds its encoder with
    ``use_entropy_loss`` off in eval mode: the tiny checkpoint must satisfy both, as the real one does."""
    raw_cfg = yaml.safe_load((tiny_dir / "config.yaml").read_text())
    assert raw_cfg["embed_dim"] == 256 and raw_cfg["ddconfig"]["z_channels"] == 256
    assert raw_cfg.get("use_entropy_loss", False) is False
    codebook = torch.load(tiny_dir / "model.ckpt", weights_only=True)["state_dict"]["quantize.embedding.weight"]
    h, w = 2, 3
    codes = torch.arange(h * w).view(1, h, w) * 9973
    z = codebook[codes.flatten()].view(1, h, w, 256).permute(0, 3, 1, 2)  # the release's fixed reshape
    with torch.no_grad():
        assert torch.allclose(tok.model.decode_latents(z).float(), tok.decode_tensor(codes), atol=1e-5)


def test_tiny_is_deterministic(tmp_path):
    a = load_state_dict(make_tiny_vq(tmp_path / "a", seed=3))
    b = load_state_dict(make_tiny_vq(tmp_path / "b", seed=3))
    c = load_state_dict(make_tiny_vq(tmp_path / "c", seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["quantize.embedding.weight"], c["quantize.embedding.weight"])


def test_plain_and_wrapped_state_dicts_load_the_same(tiny_dir, tmp_path, tok):
    sd = load_state_dict(tiny_dir)
    plain = save_checkpoint(tmp_path / "plain", _raw_config(), sd, wrap=False)
    assert "state_dict" not in torch.load(plain / "model.ckpt", weights_only=True)
    t2 = VisionTokenizer.from_pretrained(plain)
    for k, v in tok.model.state_dict().items():
        assert torch.equal(v, t2.model.state_dict()[k]), k


def test_missing_key_is_named(tiny_dir, tmp_path):
    sd = load_state_dict(tiny_dir)
    del sd["decoder.up.2.block.1.conv2.bias"]
    save_checkpoint(tmp_path, _raw_config(), sd, wrap=True)
    with pytest.raises(StateDictMismatchError, match=r"decoder\.up\.2\.block\.1\.conv2\.bias") as ei:
        VisionTokenizer.from_pretrained(tmp_path)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, CheckpointError)
    assert ei.value.missing == ["decoder.up.2.block.1.conv2.bias"] and ei.value.unexpected == []


def test_unexpected_key_is_named(tiny_dir, tmp_path):
    sd = load_state_dict(tiny_dir)
    sd["loss.discriminator.main.0.weight"] = torch.zeros(3)
    save_checkpoint(tmp_path, _raw_config(), sd)
    with pytest.raises(StateDictMismatchError, match=r"unexpected.*loss\.discriminator\.main\.0\.weight") as ei:
        VisionTokenizer.from_pretrained(tmp_path)
    assert ei.value.unexpected == ["loss.discriminator.main.0.weight"] and ei.value.missing == []


def test_shape_mismatch_is_named(tiny_dir, tmp_path):
    sd = load_state_dict(tiny_dir)
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"][:1000]
    save_checkpoint(tmp_path, _raw_config(), sd)
    with pytest.raises(StateDictMismatchError, match=r"quantize\.embedding\.weight \(checkpoint \(1000, 256\), model \(131072, 256\)\)"):
        VisionTokenizer.from_pretrained(tmp_path)


def test_not_a_state_dict(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_raw_config()))
    (tmp_path / "model.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="model.ckpt"):
        VisionTokenizer.from_pretrained(tmp_path)


def test_config_unknown_and_variant_keys_rejected():
    raw = _raw_config()
    raw["use_fancy_quantizer"] = True
    with pytest.raises(ConfigError, match="use_fancy_quantizer"):
        parse_config(raw)
    raw = _raw_config()
    raw["ddconfig"]["mystery"] = 1
    with pytest.raises(ConfigError, match="mystery"):
        parse_config(raw)
    raw = _raw_config()
    raw["ddconfig"]["use_linear_attn"] = False  # the classic value is accepted
    raw["ddconfig"]["resamp_with_conv"] = True
    raw["remap"] = None
    parse_config(raw)
    raw["ddconfig"]["use_linear_attn"] = True
    with pytest.raises(ConfigError, match="use_linear_attn"):
        parse_config(raw)
    raw = _raw_config()
    del raw["n_embed"]
    with pytest.raises(ConfigError, match="n_embed"):
        parse_config(raw)
    raw = _raw_config()
    raw["ddconfig"]["ch"] = 48  # GroupNorm(32) cannot normalise 48 channels
    with pytest.raises(ConfigError, match="multiples of 32"):
        parse_config(raw)
    raw = _raw_config()
    raw["ddconfig"]["double_z"] = True
    with pytest.raises(ConfigError, match="double_z"):
        parse_config(raw)
    raw = _raw_config()
    raw["l2_normalize"] = True
    assert "l2_normalize" in parse_config(raw).ignored
    raw["l2_normalize"] = "yes"
    with pytest.raises(ConfigError, match="l2_normalize"):
        parse_config(raw)


# ---------------------------------------------------------------- network pieces


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    blk = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 7)
    with torch.no_grad():
        got = blk(x)
        n = blk.norm(x)
        q, k, v = (m(n).reshape(2, 32, 35) for m in (blk.q, blk.k, blk.v))
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * 32**-0.5, dim=2)  # (b, hw_q, hw_k)
        ref = x + blk.proj_out(torch.bmm(v, w.transpose(1, 2)).reshape(2, 32, 5, 7))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- chunked quantiser


def _dense(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return torch.argmax(z @ e.T, dim=1)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 70),
    k=st.integers(1, 300),
    d=st.integers(1, 6),
    cp=st.integers(1, 80),
    cc=st.integers(1, 320),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_equals_dense_exact_with_ties(n, k, d, cp, cc, seed):
    # Small integers: every dot product is exact in fp32, so ties are frequent and real, and the
    # chunked result must equal torch.argmax exactly (lowest index among equal maxima).
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-2, 3, (n, d), generator=g).float()
    e = torch.randint(-2, 3, (k, d), generator=g).float()
    got = nearest_codes(z, e, chunk_pixels=cp, chunk_codes=cc)
    assert torch.equal(got, _dense(z, e))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    k=st.integers(1, 300),
    d=st.integers(1, 8),
    cp=st.integers(1, 80),
    cc=st.integers(1, 320),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_equals_dense_float64(n, k, d, cp, cc, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    e = torch.randn(k, d, generator=g, dtype=torch.float64) * torch.rand(k, 1, generator=g, dtype=torch.float64) * 3
    got = nearest_codes(z, e, chunk_pixels=cp, chunk_codes=cc)
    assert torch.equal(got, _dense(z, e))


@pytest.mark.parametrize("cp,cc", [(4096, 16384), (1000, 4096), (333, 777), (7, 5000), (77, 97)])
def test_chunked_float32_realistic(cp, cc):
    # fp32 at the real embed dim: GEMM blocking may differ between chunked and dense, so compare
    # indices where the best score is clear and, elsewhere, require the chosen score to be maximal.
    g = torch.Generator().manual_seed(1)
    z = torch.randn(300, 256, generator=g)
    e = torch.randn(9000, 256, generator=g)
    got = nearest_codes(z, e, chunk_pixels=cp, chunk_codes=cc)
    s = (z.double() @ e.double().T)
    top2 = s.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * top2[:, 0].abs().clamp(min=1)
    assert clear.sum() > 250
    assert torch.equal(got[clear], s.argmax(1)[clear])
    chosen = s.gather(1, got[:, None]).squeeze(1)
    assert torch.all(chosen >= top2[:, 0] - 1e-3)


def test_ties_go_to_lowest_index_across_chunks():
    e = torch.zeros(10, 2)
    e[3] = torch.tensor([1.0, 0.0])
    e[7] = torch.tensor([1.0, 0.0])  # same score as code 3, in a later chunk
    e[9] = torch.tensor([2.0, 0.0])  # scaled duplicate: wins on the dot product (no L2 normalisation)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # row 1 scores 0 everywhere: all tie -> code 0
    for cc in (1, 2, 3, 4, 5, 10, 64):
        assert nearest_codes(z, e, chunk_codes=cc).tolist() == [9, 0]
    assert torch.argmax(z @ e.T, dim=1).tolist() == [9, 0]  # same convention as torch.argmax


def test_quantiser_bad_arguments():
    with pytest.raises(ValueError):
        nearest_codes(torch.zeros(3, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError):
        nearest_codes(torch.zeros(3, 4), torch.zeros(5, 4), chunk_codes=0)


# ---------------------------------------------------------------- codec


def test_encode_decode_shapes_256(tok):
    grids = tok.encode([_image(256, 256)], area=256 * 256)
    assert len(grids) == 1 and grids[0].shape == (16, 16) and grids[0].dtype == np.int64
    assert 0 <= grids[0].min() and grids[0].max() < 131072
    images = tok.decode(grids)
    assert len(images) == 1 and images[0].size == (256, 256) and images[0].mode == "RGB"


def test_encode_resizes_by_area_rule(tok):
    im = _image(300, 200, seed=2)
    (g,) = tok.encode([im], area=128 * 128)
    w, h = reference_image_size(300, 200, 128 * 128)
    assert g.shape == (h // 16, w // 16) == grid_size(300, 200, 128 * 128)
    (g2,) = tok.encode([im.resize((w, h), Image.BICUBIC)], area=None)  # same pixels, no resize
    assert np.array_equal(g, g2)


def test_encode_tensor_matches_encode(tok):
    im = _image(64, 48, seed=5)
    (g,) = tok.encode([im], area=None)
    x = torch.from_numpy(np.asarray(im, dtype=np.float64) / 127.5 - 1.0).permute(2, 0, 1)[None].float()
    assert np.array_equal(tok.encode_tensor(x)[0].numpy(), g)
    with pytest.raises(ValueError):
        tok.encode_tensor(torch.zeros(1, 3, 40, 48))


class _Counter:
    def __init__(self, module: torch.nn.Module):
        self.calls, self.batch_sizes = 0, []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        self.batch_sizes.append(inputs[0].shape[0])


def test_decode_batches_equal_grids_in_one_forward(tok):
    rng = np.random.default_rng(0)
    grids = [rng.integers(0, 131072, size=(4, 6)) for _ in range(3)]
    counter = _Counter(tok.model.decoder)
    try:
        batched = tok.decode(grids)
        assert counter.calls == 1 and counter.batch_sizes == [3]
        single = [tok.decode([g])[0] for g in grids]
        assert counter.calls == 4
    finally:
        counter.handle.remove()
    for a, b in zip(batched, single):
        assert a.size == (96, 64)
        # Batched and single convolutions may round differently in the last float bit; after the
        # truncation to uint8 that can move a pixel by at most one level.
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_decode_groups_sizes_keeps_order_and_splits_by_max_batch(tiny_dir, tok):
    rng = np.random.default_rng(1)
    grids = [rng.integers(0, 131072, size=s) for s in [(2, 3), (3, 2), (2, 3), (2, 3)]]
    counter = _Counter(tok.model.decoder)
    try:
        out = tok.decode(grids)
    finally:
        counter.handle.remove()
    assert [im.size for im in out] == [(48, 32), (32, 48), (48, 32), (48, 32)]
    assert counter.calls == 2 and sorted(counter.batch_sizes) == [1, 3]
    small = VisionTokenizer(tok.model, tok.config, max_batch=2)
    counter = _Counter(small.model.decoder)
    try:
        small.decode(grids)
    finally:
        counter.handle.remove()
    assert sorted(counter.batch_sizes) == [1, 1, 2]


def test_encode_batches_equal_sizes(tok):
    ims = [_image(64, 64, 1), _image(80, 48, 2), _image(64, 64, 3)]
    counter = _Counter(tok.model.encoder)
    try:
        grids = tok.encode(ims, area=None)
    finally:
        counter.handle.remove()
    assert counter.calls == 2 and sorted(counter.batch_sizes) == [1, 2]
    assert [g.shape for g in grids] == [(4, 4), (3, 5), (4, 4)]


def test_decode_rejects_bad_grids(tok):
    with pytest.raises(ValueError, match="131072"):
        tok.decode([np.full((2, 2), 131072)])
    with pytest.raises(ValueError):
        tok.decode([np.zeros((2, 2), dtype=np.float32)])
    with pytest.raises(ValueError):
        tok.decode([np.zeros(4, dtype=np.int64)])


def test_l2_normalize_true_is_accepted_logged_and_not_applied(tmp_path, tok, caplog):
    """The release's IBQ never hands l2_normalize to its quantiser: codes and pixels are those of the
    same weights without the key, and a log line says so."""
    with caplog.at_level(logging.INFO, logger="service.vq.checkpoint"):
        t2 = VisionTokenizer.from_pretrained(make_tiny_vq(tmp_path, seed=0, l2_normalize=True))
    assert any("l2_normalize" in r.getMessage() and "not applied" in r.getMessage() for r in caplog.records)
    x = torch.from_numpy(np.asarray(_image(32, 32), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        z = t2.model.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, t2.codebook.shape[1])
    codes = t2.encode_tensor(x)
    assert torch.equal(codes, _dense(z, t2.codebook).view(codes.shape))
    assert torch.equal(codes, tok.encode_tensor(x))
    grid = codes[0].cpu().numpy()
    assert np.array_equal(np.asarray(t2.decode([grid])[0]), np.asarray(tok.decode([grid])[0]))


def test_bfloat16_smoke(tiny_dir):
    t = VisionTokenizer.from_pretrained(tiny_dir, dtype="bf16")
    assert t.codebook.dtype == torch.bfloat16
    (g,) = t.encode([_image(48, 32)], area=None)
    assert g.shape == (2, 3)
    assert t.decode([g])[0].size == (48, 32)


# ---------------------------------------------------------------- resize rule


@pytest.mark.parametrize(
    "w,h,area,expect",
    [
        (1024, 1024, 1024 * 1024, (1024, 1024)),
        (512, 512, 1024 * 1024, (1024, 1024)),
        (1920, 1080, 518_400, (960, 544)),
        (1080, 1920, 518_400, (544, 960)),
        (4000, 3000, 1024 * 1024, (1184, 880)),
        (10, 10, 100, (16, 16)),  # rounds up to the minimum
        (4, 4, 16, (16, 16)),  # the release would give 0 here; we clamp to one token
    ],
)
def test_reference_image_size_table(w, h, area, expect):
    assert reference_image_size(w, h, area) == expect


@settings(max_examples=200, deadline=None)
@given(w=st.integers(64, 5000), h=st.integers(64, 5000), area=st.sampled_from([256 * 256, 518_400, 1024 * 1024]))
def test_reference_image_size_properties(w, h, area):
    nw, nh = reference_image_size(w, h, area)
    assert nw % 16 == 0 and nh % 16 == 0 and nw >= 16 and nh >= 16
    if max(w / h, h / w) <= 4:  # moderate aspect: near the area and near the aspect
        assert abs(nw * nh / area - 1) < 0.08
        assert abs((nw / nh) / (w / h) - 1) < 0.08


def test_reference_image_size_none_and_errors():
    assert reference_image_size(1000, 777, None) == (1008, 784)
    assert reference_image_size(256, 256, None) == (256, 256)
    with pytest.raises(ValueError):
        reference_image_size(0, 10, 100)
    with pytest.raises(TypeError):
        reference_image_size(10.5, 10, 100)


def test_resize_module_and_package_do_not_import_torch():
    code = (
        "import sys; import service.vq.resize; import service.vq; "
        "from service.vq import reference_image_size; reference_image_size(3, 2, 100); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'numpy' not in sys.modules, 'numpy imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("bad", ["", "gpu", "cuda:x", "cuda:-1", "cpu:0", "npu0", "tpu:0", "cuda:0:1", None, 3])
def test_bad_device_strings(bad):
    with pytest.raises(DeviceError):
        resolve_device(bad)


def test_cpu_device_does_not_touch_torch_npu(monkeypatch):
    if "torch_npu" in sys.modules:
        pytest.skip("torch_npu already imported in this process")
    attempts = []

    class Recorder:
        def find_spec(self, name, path=None, target=None):
            if name == "torch_npu":
                attempts.append(name)
            return None  # let the normal finders decide

    monkeypatch.setattr(sys, "meta_path", [Recorder(), *sys.meta_path])
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert attempts == [] and "torch_npu" not in sys.modules
    try:
        import importlib.util

        installed = importlib.util.find_spec("torch_npu") is not None
    finally:
        attempts.clear()
    if installed:
        return
    with pytest.raises(DeviceError, match="torch_npu"):
        resolve_device("npu:0")
    assert attempts == ["torch_npu"]  # asking for an npu is what triggers the import


@pytest.mark.skipif(torch.cuda.is_available(), reason="machine has CUDA")
def test_cuda_unavailable_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_dtypes():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError):
        resolve_dtype("int8")


def test_bad_device_fails_before_loading(tmp_path):
    with pytest.raises(DeviceError):
        VisionTokenizer.from_pretrained(tmp_path, device="gpu:0")  # folder is empty: device checked first
