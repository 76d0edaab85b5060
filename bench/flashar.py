#!/usr/bin/env python3
"""FlashAR benchmark (not a test): the same guided T2I grid through the AR engines and the FlashAR engine.

Default (this machine, one run): the tiny checkpoints (``make-tiny --flashar``; real 282,926-token
vocabulary), one guided, seeded 32×32 T2I request through the vLLM engine (skipped without vLLM), the
reference engine and the FlashAR engine: decode steps (logit-producing forwards) and seconds per image,
and the ratios of the AR engines to FlashAR.

``--real-width`` (an accelerator box, no checkpoint needed): random-weight models of Emu3.5's real width
(hidden 5120, vocabulary 282,926, 64/8 heads of 128, FFN 25,600; ``--layers`` of them, the FlashAR model
with ``min(4, layers)`` vertical layers) built in memory in bf16 on ``--device``; seconds per 32×32 image
at one request for the FlashAR engine against the AR reference engine. Random weights change nothing in
the work done per step: the grid is forced and every step is a full forward.

    python bench/flashar.py [--grid 32] [--json out.json]
    python bench/flashar.py --device cuda --real-width [--layers 8] [--engines flashar,reference] --json OUT
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from service.engine.flashar.checkpoint import FlashARConfig, load_flashar_weights  # noqa: E402
from service.engine.flashar.engine import FlashARCore, flashar_header, flashar_uncond, run_jobs  # noqa: E402
from service.engine.flashar.network import FlashARNetwork  # noqa: E402
from service.task import GenerationOptions, plan_request  # noqa: E402
from service.tokenizer import Emu35Tokenizer  # noqa: E402

#: Emu3.5's transformer shape (docs/flashar.md §1; 64 layers in the release).
REAL = dict(hidden_size=5120, intermediate_size=25600, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
            vocab_size=282926)


def t2i_request(tok: Emu35Tokenizer, grid: int, tag: str):
    """A guided (CFG 5.0), seeded T2I request forced to a grid×grid image."""
    return plan_request(tok, "t2i", "a red car on a street", [], GenerationOptions(size=f"{16 * grid}x{16 * grid}",
                                                                                   seed=7), tag)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device.startswith("npu"):
        torch.npu.synchronize()  # type: ignore[attr-defined]


# ---- the engines, one image each --------------------------------------------------------------------
def time_flashar(net: FlashARNetwork, tok: Emu35Tokenizer, grid: int, device: str) -> dict:
    def once(tag: str) -> tuple[float, int, int]:
        core = FlashARCore(net, slots=2, fallback_seed=0)
        req = t2i_request(tok, grid, tag)
        job = core.make_job(req, flashar_header(tok, grid, grid), flashar_uncond(tok), tok.ids.eol, tok.ids.eoi)
        _sync(device)
        t0 = time.perf_counter()
        (ids,) = run_jobs(core, [job]).values()
        _sync(device)
        return time.perf_counter() - t0, core.forwards, len(ids)

    once("warmup")
    seconds, steps, tokens = once("run")
    return {"decode_steps": steps, "seconds_per_image": round(seconds, 3), "tokens": tokens}


def time_reference(engine, tok: Emu35Tokenizer, grid: int, device: str) -> dict:
    def once(tag: str) -> tuple[float, int, int]:
        req = t2i_request(tok, grid, tag)
        _sync(device)
        t0 = time.perf_counter()
        deltas = list(engine.generate(req))
        _sync(device)
        return time.perf_counter() - t0, sum(d.steps for d in deltas), sum(len(d.token_ids) for d in deltas)

    once("warmup")
    seconds, steps, tokens = once("run")
    return {"decode_steps": steps, "seconds_per_image": round(seconds, 3), "tokens": tokens}


async def _time_vllm_async(model_dir: Path, tok_dir: Path, tok: Emu35Tokenizer, grid: int) -> dict:
    from service.engine.config import VllmEngineConfig
    from service.engine.vllm_engine import VllmEngine

    engine = VllmEngine(VllmEngineConfig(model=str(model_dir), tokenizer=str(tok_dir), dtype="float32",
                                         max_model_len=2 * grid * (grid + 1) + 512, max_pairs=1), tok)
    engine.start()
    try:
        async def once(tag: str) -> tuple[float, int, int]:
            t0 = time.perf_counter()
            steps = tokens = 0
            async for d in engine.generate(t2i_request(tok, grid, tag)):
                steps += d.steps
                tokens += len(d.token_ids)
            return time.perf_counter() - t0, steps, tokens

        await once("warmup")
        seconds, steps, tokens = await once("run")
        return {"decode_steps": steps, "seconds_per_image": round(seconds, 3), "tokens": tokens}
    finally:
        engine.shutdown()


# ---- model builders ------------------------------------------------------------------------------------
def real_width_flashar(layers: int, device: str, tok: Emu35Tokenizer) -> FlashARNetwork:
    """A random FlashAR network of the real width, built on ``device`` in bf16."""
    k = min(4, layers)
    base = {"num_hidden_layers": layers, "intermediate_size": REAL["intermediate_size"],
            "num_attention_heads": REAL["num_attention_heads"], "num_key_value_heads": REAL["num_key_value_heads"],
            "head_dim": REAL["head_dim"], "rms_norm_eps": 1e-6, "rope_theta": 1e6, "pad_token_id": tok.ids.pad,
            "eoi_token_id": tok.ids.eoi}
    cfg = FlashARConfig.from_raw({"model_type": "emu3_flashar", "vocab_size": REAL["vocab_size"],
                                  "hidden_size": REAL["hidden_size"], "vertical_layers": k,
                                  "vertical_start_layer": layers - k, "backbone_config": base})
    gen = torch.Generator(device).manual_seed(0)
    weights = {}
    for name, shape in cfg.expected_shapes().items():
        if len(shape) == 1 and "bias" not in name:
            weights[name] = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            weights[name] = (0.02 * torch.randn(shape, generator=gen, device=device)).to(torch.bfloat16)
    return FlashARNetwork(cfg, weights, [torch.device(device)], torch.bfloat16)


def real_width_reference(layers: int, device: str, tok: Emu35Tokenizer):
    """The AR reference engine around a random Qwen3-shaped model of the real width, bf16 on ``device``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from service.engine.reference.engine import ReferenceEngine
    from service.lm_checkpoint import Emu3Config

    raw = {"model_type": "Emu3", **REAL, "num_hidden_layers": layers, "max_position_embeddings": 32768,
           "rms_norm_eps": 1e-6, "rope_theta": 1e6}
    cfg = Emu3Config(raw)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(Qwen3Config(**cfg.qwen3_kwargs(), attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(default)
    # a random model would write text until max_new_tokens: make it open the image at once, as the real
    # model does for T2I (BOI is masked by the rules everywhere but in text, so this changes nothing else)
    boi = tok.ids.boi

    def open_image(_module, _inputs, logits):
        logits[..., boi] += 1e4
        return logits

    model.lm_head.register_forward_hook(open_image)
    return ReferenceEngine(None, tok, device, torch.bfloat16, model=model, config=cfg)


# ---- runs ------------------------------------------------------------------------------------------------
def _ratios(out: dict) -> dict:
    fa = out["engines"].get("flashar")
    if not fa:
        return {}
    return {name: {"decode_steps_ratio": round(r["decode_steps"] / fa["decode_steps"], 2),
                   "seconds_ratio": round(r["seconds_per_image"] / fa["seconds_per_image"], 2)}
            for name, r in out["engines"].items() if name != "flashar"}


def tiny_run(args) -> dict:
    from service.tiny.make import ensure_tiny, make_tiny

    tiny = make_tiny(ensure_tiny(), flashar=True)
    tok = Emu35Tokenizer.from_dir(tiny / "tokenizer")
    out: dict = {"mode": "tiny", "grid": [args.grid, args.grid], "device": "cpu", "engines": {}}
    engines = args.engines.split(",")
    if "flashar" in engines:
        cfg, weights = load_flashar_weights(tiny / "flashar")
        net = FlashARNetwork(cfg, weights, [torch.device("cpu")], torch.float32)
        out["engines"]["flashar"] = time_flashar(net, tok, args.grid, "cpu")
    if "reference" in engines:
        from service.engine.reference.engine import ReferenceEngine

        out["engines"]["reference"] = time_reference(ReferenceEngine(tiny / "model", tok), tok, args.grid, "cpu")
    if "vllm" in engines:
        if importlib.util.find_spec("vllm") is None:
            out["skipped"] = ["vllm (not installed)"]
        else:
            out["engines"]["vllm"] = asyncio.run(_time_vllm_async(tiny / "model", tiny / "tokenizer", tok, args.grid))
    out["ratios_vs_flashar"] = _ratios(out)
    return out


def real_width_run(args) -> dict:
    from service.tiny.tokenizer_files import write_tokenizer

    tok = Emu35Tokenizer.from_dir(write_tokenizer(Path(tempfile.mkdtemp(prefix="emu35-tok-"))))
    out: dict = {"mode": "real-width", "layers": args.layers, "grid": [args.grid, args.grid], "device": args.device,
                 "dtype": "bfloat16", "width": REAL, "engines": {}}
    for name in args.engines.split(","):
        if name == "flashar":
            net = real_width_flashar(args.layers, args.device, tok)
            out["engines"]["flashar"] = time_flashar(net, tok, args.grid, args.device)
            del net
        elif name == "reference":
            engine = real_width_reference(args.layers, args.device, tok)
            out["engines"]["reference"] = time_reference(engine, tok, args.grid, args.device)
            del engine
        elif name == "vllm":
            out.setdefault("skipped", []).append("vllm (not built at real width)")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    out["ratios_vs_flashar"] = _ratios(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, default=32, help="side of the square T2I grid in tokens (32: 512² px)")
    ap.add_argument("--engines", default=None, help="comma list of vllm, reference, flashar (default: all)")
    ap.add_argument("--real-width", action="store_true", help="random models of Emu3.5's real width, in memory")
    ap.add_argument("--layers", type=int, default=8, help="--real-width: decoder layers (the release has 64)")
    ap.add_argument("--device", default="cpu", help="--real-width: cpu, cuda[:N] or npu[:N]")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.engines is None:
        args.engines = "flashar,reference" if args.real_width else "flashar,reference,vllm"
    result = real_width_run(args) if args.real_width else tiny_run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
