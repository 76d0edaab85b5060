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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.config import VllmEngineConfig  # noqa: E402
from service.task import GenerationOptions, plan_request  # noqa: E402
from service.tiny.make import ensure_tiny  # noqa: E402
from service.tokenizer import Emu35Tokenizer  # noqa: E402

IMAGE_TOKENS = 77  # BOI "8*8" IMG, 8 rows of 8 + EOL (EOI closes the last)


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


async def emu35_part(model_dir: Path, tok_dir: Path, tok: Emu35Tokenizer, repeats: int) -> dict:
    from service.engine.vllm_engine import VllmEngine

    engine = VllmEngine(VllmEngineConfig(model=str(model_dir), tokenizer=str(tok_dir), dtype="float32",
                                         max_model_len=1024, max_pairs=8), tok)
    engine.start()
    try:
        await run_emu35(engine, t2i_requests(tok, 2, "warmup"))
        out: dict = {"throughput": {}}
        for conc in (1, 2, 4, 8):
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


async def plain_part(model_dir: Path, tok: Emu35Tokenizer, repeats: int) -> dict:
    """vLLM as it ships: default scheduler, no logits processor, greedy; the same 16 prompts and lengths."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from service.engine.in_vllm.plugin import register

    register()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model_dir), skip_tokenizer_init=True, model_impl="vllm", generation_config="vllm",
        dtype="float32", max_model_len=1024, max_num_seqs=16, enforce_eager=True, enable_prefix_caching=True,
        async_scheduling=False))
    image = t2i_requests(tok, 1, "x")[0].image_sampling  # the task's image sampling settings

    def params(i: int, greedy: bool):
        kw = dict(temperature=0.0) if greedy else dict(
            temperature=image.temperature, top_k=image.top_k, top_p=image.top_p, seed=i)
        return SamplingParams(max_tokens=IMAGE_TOKENS, ignore_eos=True, detokenize=False,
                              output_kind=RequestOutputKind.DELTA, **kw)

    async def batch(tag: str, greedy: bool = False, pairs: int = 8) -> float:
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


async def main_async(args) -> dict:
    tiny = ensure_tiny()
    tok = Emu35Tokenizer.from_dir(tiny / "tokenizer")
    plain = await plain_part(tiny / "model", tok, args.repeats)
    emu = await emu35_part(tiny / "model", tiny / "tokenizer", tok, args.repeats)
    t = emu["throughput"]
    return {
        "throughput_by_concurrency": t,
        "throughput_ratio_8_vs_1": round(t[8]["tokens_per_s"] / t[1]["tokens_per_s"], 2),
        # the same ratio for vLLM sampling 2 vs 16 sequences without Emu3.5's rules: what the hardware allows
        "plain_vllm_ratio_8_vs_1": round(8 * plain["one_pair_step_ms"] / plain["step_ms"], 2),
        "plain_vllm_sampling_step_ms_16_seqs": plain["step_ms"],
        "plain_vllm_greedy_step_ms_16_seqs": plain["greedy_step_ms"],
        "emu35_step_ms_16_seqs": t[8]["step_ms"],
        "overhead_vs_plain_sampling": round(t[8]["step_ms"] / plain["step_ms"] - 1.0, 3),
        "overhead_vs_plain_greedy": round(t[8]["step_ms"] / plain["greedy_step_ms"] - 1.0, 3),
        "engine_stats": emu["stats"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the report here")
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
