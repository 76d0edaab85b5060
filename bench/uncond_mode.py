#!/usr/bin/env python3
"""Uncond-mode benchmark (not a test): what the ``reference`` uncond mode costs next to ``lockstep``.

On the tiny checkpoint through the vLLM engine, in one run, the same guided howto requests (answers with
text before and between images, greedy) in both modes. The answers of the two modes part at the first
pixel after text, so counts are reported per mode and per image:

* lockstep: the uncond request is prefilled once and then decodes every generated token, text included;
* reference: the cond request runs alone between images, and each image starts an uncond request whose
  prompt (uncond prompt + image spans so far) is prefilled again, prefix caching serving the full
  blocks it already holds. Those prompt tokens that miss the cache are the *extra prefill per image*.

Reported: wall time per mode and their ratio, uncond tokens decoded, uncond prompt tokens prefilled,
and the extra prefill tokens per image. Ratios carry over between machines, not absolute numbers.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/uncond_mode.py [--size 128x128] [--block-size 32] \\
        [--concurrency 4] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.config import VllmEngineConfig  # noqa: E402
from service.engine.policy.spans import PIXELS, ImageSpans, SpanTokens  # noqa: E402
from service.task import GenerationOptions, plan_request  # noqa: E402
from service.tiny.make import ensure_tiny  # noqa: E402
from service.tokenizer import Emu35Tokenizer  # noqa: E402
from service.types import SamplingSettings  # noqa: E402

GREEDY = SamplingSettings(1, 1.0, 1.0)


def requests(tok: Emu35Tokenizer, mode: str, n: int, size: str, max_new: int, tag: str):
    return [plan_request(tok, "howto", f"how to make tea, way {i}", [],
                         GenerationOptions(size=size, text=GREEDY, image=GREEDY, max_new_tokens=max_new,
                                           uncond_mode=mode), f"{tag}-{mode}-{i}") for i in range(n)]


async def run_batch(engine, reqs) -> tuple[float, list[list[int]]]:
    async def one(req):
        ids: list[int] = []
        async for d in engine.generate(req):
            ids += d.token_ids
        return ids

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(r) for r in reqs))
    return time.perf_counter() - t0, list(out)


def images_and_bodies(tok: Emu35Tokenizer, answers: list[list[int]]) -> tuple[int, int]:
    """Images in the answers, and their body tokens (after IMG, through EOI): what a reference-mode
    uncond request decodes."""
    images = bodies = 0
    for ids in answers:
        spans = ImageSpans(SpanTokens.from_tokenizer(tok))
        for t in ids:
            in_body = spans.mode == PIXELS
            images += spans.feed(t) is not None
            bodies += in_body
    return images, bodies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="128x128", help="image size (128x128: 8×8 tokens)")
    ap.add_argument("--max-new-tokens", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size (vLLM's CPU default: 128; CPU attention needs a multiple of 32)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from service.engine.vllm_engine import VllmEngine

    tiny = ensure_tiny()
    tok = Emu35Tokenizer.from_dir(tiny / "tokenizer")
    cfg = VllmEngineConfig(model=str(tiny / "model"), tokenizer=str(tiny / "tokenizer"), dtype="float32",
                           max_model_len=2048, max_pairs=args.concurrency, block_size=args.block_size)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(1800)

    engine = VllmEngine(cfg, tok)

    async def start():
        engine.start()

    run(start())
    report: dict = {"size": args.size, "concurrency": args.concurrency, "block_size": engine.block_size,
                    "max_new_tokens": args.max_new_tokens, "modes": {}}
    try:
        run(run_batch(engine, requests(tok, "lockstep", 1, args.size, 40, "warm")))  # warm-up
        answers: dict[str, list[list[int]]] = {}
        for mode in ("lockstep", "reference"):
            times = []
            before = (engine.uncond_prefill.requests, engine.uncond_prefill.prompt_tokens,
                      engine.uncond_prefill.computed_tokens)
            for r in range(args.repeats):
                seconds, out = run(run_batch(engine, requests(tok, mode, args.concurrency, args.size,
                                                              args.max_new_tokens, f"r{r}")))
                times.append(seconds)
                answers[mode] = out
            p = engine.uncond_prefill
            reqs, prompt, computed = (p.requests - before[0], p.prompt_tokens - before[1],
                                      p.computed_tokens - before[2])
            generated = sum(len(a) for a in answers[mode]) * args.repeats
            images, bodies = (n * args.repeats for n in images_and_bodies(tok, answers[mode]))
            report["modes"][mode] = {
                "seconds_median": round(statistics.median(times), 3),
                "uncond_requests": reqs,
                "uncond_prompt_tokens": prompt,
                "uncond_prefilled_tokens": computed,
                "uncond_decoded_tokens": generated if mode == "lockstep" else bodies,
                "images": images,
                "generated_tokens": generated,
            }
        lock, ref = report["modes"]["lockstep"], report["modes"]["reference"]
        first_prefill = lock["uncond_prefilled_tokens"] / max(1, lock["uncond_requests"])
        report["reference_vs_lockstep"] = {
            "time_ratio": round(ref["seconds_median"] / lock["seconds_median"], 3),
            # each image's uncond request minus what lockstep prefills once per generation
            "extra_prefill_tokens_per_image": round(
                (ref["uncond_prefilled_tokens"] - lock["uncond_prefilled_tokens"]) / max(1, ref["images"]), 1),
            "uncond_prefill_per_image": round(ref["uncond_prefilled_tokens"] / max(1, ref["images"]), 1),
            "prefix_cache_hit_share": round(1 - ref["uncond_prefilled_tokens"] / max(1, ref["uncond_prompt_tokens"]), 3),
            "lockstep_uncond_prompt_per_generation": round(first_prefill, 1),
            "uncond_decodes_saved_share": round(1 - ref["uncond_decoded_tokens"] / max(1, lock["uncond_decoded_tokens"]), 3),
        }
    finally:
        engine.shutdown()
        loop.call_soon_threadsafe(loop.stop)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
