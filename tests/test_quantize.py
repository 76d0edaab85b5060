"""``python -m service quantize`` on the tiny model (bf16, tokenizer in the folder, as released): msModelSlim
runs the packaged W8A8 recipe through this package's adapter; the output has the files and layer types the
issue lists; the quantised logits stay close to the unquantised model's.

The quantised model is built once per machine (``tiny_w8a8`` fixture, cached like the tiny checkpoints).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from service.quant.calib_tokenizer import CalibrationTokenizer
from service.quant.calibration import CalibrationPlan, calibration_ids, write_calibration
from service.quant.quantize import default_config, quantize_main, run_config
from service.tokenizer import TIKTOKEN_FILE, VISION_FILE
from tests.quant_env import HAVE_MSMODELSLIM, NO_MSMODELSLIM

pytestmark = pytest.mark.skipif(not HAVE_MSMODELSLIM, reason=NO_MSMODELSLIM)

#: The Ascend guide's configuration, as the issue gives it (parsed the same way as the packaged file:
#: YAML 1.1 reads ``1e-5`` as a string, which msModelSlim's pydantic model turns into a float).
GUIDE_YAML = yaml.safe_load("""
apiversion: modelslim_v1
spec:
  process:
    - {type: iter_smooth, alpha: 0.9, scale_min: 1e-5, symmetric: True,
       enable_subgraph_type: ['norm-linear', 'linear-linear', 'ov', 'up-down'],
       include: ["*"], exclude: ["*self_attn*"]}
    - {type: quarot, online: False, block_size: -1, max_tp_size: 4, down_proj_online_layers: []}
    - type: linear_quant
      qconfig:
        act: {scope: per_token, dtype: int8, symmetric: True, method: minmax}
        weight: {scope: per_channel, dtype: int8, symmetric: True, method: minmax}
      include: ["*"]
      exclude: ["*down_proj*"]
  save:
    - {type: ascendv1_saver, part_file_size: 4}
""")
QUANTISED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj")
FLOAT_IN_LAYER = ("mlp.down_proj", "input_layernorm", "post_attention_layernorm", "self_attn.q_norm",
                  "self_attn.k_norm")


def description(w8a8: Path) -> dict:
    return json.loads((w8a8 / "quant_model_description.json").read_text())


def tensors(w8a8: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in w8a8.glob("quant_model_weights-*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ---- configuration and calibration (no msModelSlim run) -------------------------------------------
def test_the_packaged_default_is_the_guides_configuration():
    assert default_config() == GUIDE_YAML


def test_run_config_sets_the_calibration_file_and_max_tp_size(tmp_path):
    cfg = run_config(default_config(), tmp_path / "calib.json", max_tp_size=2)
    assert cfg["spec"]["dataset"] == str(tmp_path / "calib.json")
    (quarot,) = [p for p in cfg["spec"]["process"] if p["type"] == "quarot"]
    assert quarot["max_tp_size"] == 2
    assert default_config() == GUIDE_YAML  # the packaged file is not changed


def test_calibration_uses_emu35_templates_with_visual_tokens(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    plan = CalibrationPlan(t2i=2, x2i=1, narrative=1, grid=6)
    samples = calibration_ids(tok, plan)
    assert len(samples) == 4
    texts = [tok.decode(s) for s in samples]
    assert all(s[0] == tok.ids.bos for s in samples)
    assert "for t2i task." in texts[0] and "for x2i task." in texts[2] and "for story task." in texts[3]
    for ids in samples:
        visual = [i for i in ids if tok.is_visual(i)]
        assert ids.count(tok.ids.img) >= 1 and ids[-1] in (tok.ids.eoi, tok.ids.eos)
        assert len(visual) >= 36 and len(set(visual)) > 5  # whole images, not a single repeated code
    assert samples[2].count(tok.ids.boi) == 2  # X2I: reference image in the prompt + the answer
    assert tok.ids.bog in samples[3] and tok.ids.boc in samples[3]
    # msModelSlim reads strings: the written file encodes back to exactly these ids
    path = tmp_path / "calib.json"
    assert write_calibration(tok, path, plan) == 4
    calib_tok = CalibrationTokenizer(tok)
    assert [calib_tok.encode(t) for t in json.loads(path.read_text())] == samples


def test_calibration_tokenizer_pads_like_hugging_face(tiny_tokenizer):
    tok = CalibrationTokenizer(tiny_tokenizer)
    batch = tok(["a cat", "a red car on a street"], return_tensors="pt", padding=True)
    ids, mask = batch.data["input_ids"], batch.data["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    short = len(tiny_tokenizer.encode("a cat"))
    assert mask[0].tolist() == [1] * short + [0] * (ids.shape[1] - short)
    assert (ids[0, short:] == tiny_tokenizer.ids.pad).all()


def test_not_an_emu35_checkpoint_is_refused_clearly(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 8}))
    assert quantize_main(["--model", str(tmp_path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not an Emu3.5 checkpoint" in err and "model_type is 'qwen3'" in err
    assert quantize_main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "no such folder" in capsys.readouterr().err


def run_with_msmodelslim(code: str) -> str:
    """``code`` in a child Python (importing msModelSlim patches pydantic process-wide); its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bf16_norm_fix_returns_the_dtype_it_was_given():
    """msModelSlim's replacement RMSNorm returns float32; the next bf16 Linear would refuse it."""
    out = run_with_msmodelslim("""
        import torch
        from msmodelslim.ir.rms_norm import RMSNorm
        from service.quant.msmodelslim_adapter import install_norm_dtype_fix
        norm = RMSNorm(8).to(torch.bfloat16)
        x = torch.randn(2, 8, dtype=torch.bfloat16)
        before = norm(x).dtype
        install_norm_dtype_fix()
        print(before, norm(x).dtype, torch.nn.LayerNorm(8)(torch.randn(2, 8)).dtype)
    """)
    assert out.split() == ["torch.float32", "torch.bfloat16", "torch.float32"]  # other modules untouched


def test_entry_points_name_this_adapter(tiny_w8a8):
    out = run_with_msmodelslim(f"""
        from msmodelslim.model import PluginModelFactory
        for name in ("EMU3.5", "Emu3.5-Image"):
            adapter = PluginModelFactory().create(name, {str(tiny_w8a8 / "bf16")!r})
            print(type(adapter).__module__ + "." + type(adapter).__name__, adapter.config.model_type,
                  adapter.config.num_hidden_layers, adapter.tokenizer.pad_token_id)
    """)
    rows = [line.split() for line in out.splitlines() if line.startswith("service.")]
    assert rows == [["service.quant.msmodelslim_adapter.Emu35ModelAdapter", "qwen3", "2", "151643"]] * 2


# ---- the quantised tiny model ------------------------------------------------------------------
def test_quantize_ran_msmodelslim_through_this_adapter(tiny_w8a8):
    log = (tiny_w8a8 / "quantize.log").read_text(errors="replace")
    assert "emu35 msModelSlim adapter: service.quant.msmodelslim_adapter.Emu35ModelAdapter for EMU3.5" in log
    assert "Using model adapter Emu35ModelAdapter" in log
    assert "trying default adapter" not in log and "DefaultModelAdapter" not in log
    assert "Naive Quant apply config_path" in log and "===========SUCCESS===========" in log
    assert "[emu35 quantize] done" in log


def test_output_has_the_listed_files(tiny_w8a8):
    out, src = tiny_w8a8 / "w8a8", tiny_w8a8 / "bf16"
    shards = sorted(out.glob("quant_model_weights-*-of-*.safetensors"))
    assert shards
    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    desc = description(out)
    assert desc["model_quant_type"] == "W8A8_DYNAMIC" and "version" in desc
    assert (out / "optional" / "quarot.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((src / "config.json").read_text()) and "quantization_config" not in config
    for name in (TIKTOKEN_FILE, VISION_FILE):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_linear_layers_are_int8_and_the_rest_float(tiny_w8a8):
    out = tiny_w8a8 / "w8a8"
    desc, weights = description(out), tensors(out)
    config = json.loads((out / "config.json").read_text())
    for layer in range(config["num_hidden_layers"]):
        for name in QUANTISED:
            p = f"model.layers.{layer}.{name}"
            assert desc[p + ".weight"] == "W8A8_DYNAMIC"
            w, s, o = weights[p + ".weight"], weights[p + ".weight_scale"], weights[p + ".weight_offset"]
            assert w.dtype == torch.int8 and w.abs().max() > 64  # the int8 range is used
            assert s.shape == o.shape == (w.shape[0], 1) and (s > 0).all() and (o == 0).all()
        for name in FLOAT_IN_LAYER:
            key = f"model.layers.{layer}.{name}.weight"
            assert desc[key] == "FLOAT" and weights[key].dtype == torch.bfloat16
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert desc[key] == "FLOAT" and weights[key].dtype == torch.bfloat16


def test_quantised_logits_stay_close_to_the_unquantised_model(tiny_w8a8, tiny_dir, tiny_tokenizer):
    """Teacher-forced on fixed Emu3.5 sequences (T2I, X2I, narrative; not the calibration samples)."""
    from service.engine.reference.engine import load_qwen3_model
    from tests.w8a8_emulation import compare, load_emulated, teacher_forced_logits

    reference, _ = load_qwen3_model(tiny_dir / "model")  # the float32 original
    quantised = load_emulated(tiny_w8a8 / "w8a8")
    prompts = calibration_ids(tiny_tokenizer, CalibrationPlan(t2i=2, x2i=1, narrative=1, grid=8, seed=2024))
    ref = torch.cat([teacher_forced_logits(reference, ids) for ids in prompts])
    got = torch.cat([teacher_forced_logits(quantised, ids) for ids in prompts])
    assert not torch.equal(ref, got)  # it really is another model
    cosine, top1 = compare(ref, got)
    worst = torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1).min().item()
    print(f"\nW8A8 vs unquantised, {ref.shape[0]} positions: logits cosine mean {cosine:.7f} "
          f"(1 - cos = {1 - cosine:.2e}, worst position {worst:.7f}), top-1 agreement {top1:.2%}")
    assert worst >= 0.99, worst
    assert cosine >= 0.99, cosine
    assert top1 >= 0.90, top1
    assert np.isfinite(cosine)


def test_msmodelslim_never_enters_this_process():
    """Everything above ran msModelSlim in child processes: importing it here would patch pydantic for
    every later test (and in the service, for the settings)."""
    import service.quant.quantize  # noqa: F401
    import service.quant.serving  # noqa: F401

    assert "msmodelslim" not in sys.modules
