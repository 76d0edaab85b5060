#!/usr/bin/env python3
"""Batch benchmark (not a test): what ``python -m service generate`` gains over the release's loop.

On the tiny checkpoint, in one run:

1. plain vLLM's own gain from batching on this machine, as ``bench/engine.py`` measures it: the same
   guided T2I prompts (8×8-token images, 77 tokens) as 8 pairs at once against 1 pair, with no Emu3.5
   processor or pair scheduler: ``gain = 8 · t(1 pair) / t(8 pairs)``;
2. 16 T2I prompts from a release-format config, through one Emu3.5 engine: first one at a time (the
   release's ``inference.py`` loop: plan, generate, decode, write the record, next), then through the
   batch command's runner with ``--max-concurrent 8`` into a fresh folder. ``gain = t(loop) / t(batch)``.

The figure of merit is ``batch_gain / plain_vllm_gain`` (goal: at least 0.9). Ratios, not absolute
times, carry over between machines. Run as

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/batch.py [--prompts 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import Setup, plain_part  # noqa: E402
from service.batch.items import Item  # noqa: E402
from service.batch.progress import LogProgress  # noqa: E402
from service.batch.records import write_record  # noqa: E402
from service.batch.release_config import read_release_config  # noqa: E402
from service.batch.run import generate_one, plan_batch, run_batch, started_runner  # noqa: E402
from service.settings import load_settings  # noqa: E402
from service.tiny.make import ensure_tiny  # noqa: E402
from service.tokenizer import Emu35Tokenizer  # noqa: E402
from tests.batch_inputs import write_release_config  # noqa: E402

#: 1:1 at 128×128 px: the 8×8-token grid bench/engine.py's plain vLLM run generates.
AREA = 128 * 128
CONCURRENT = 8


async def release_loop(runner, items: list[Item], out: Path) -> float:
    """The release's loop: each prompt planned, generated, decoded and written before the next starts."""
    t0 = time.perf_counter()
    for item in items:
        outcome = await generate_one(runner, item)
        write_record(out, item.name, outcome.record)
    return time.perf_counter() - t0


async def engine_only(runner, items: list[Item]) -> dict:
    """Where the time goes: the engine alone (tokens, no VQ decode, no record) one at a time and 8 at
    once, and the VQ worker's decode of one image, which a batch cannot overlap with itself."""
    from service.task import GenerationInput

    async def tokens(item: Item, tag: str) -> None:
        gen = GenerationInput(item.task, item.question, (), item.options)
        prepared = await runner.prepare(gen, f"{tag}-{item.name}")
        async for _ in runner.engine.generate(prepared.request):
            pass

    t0 = time.perf_counter()
    for item in items:
        await tokens(item, "seq")
    seq = time.perf_counter() - t0
    slots = asyncio.Semaphore(CONCURRENT)

    async def bounded(item: Item) -> None:
        async with slots:
            await tokens(item, "par")

    t0 = time.perf_counter()
    await asyncio.gather(*(bounded(i) for i in items))
    par = time.perf_counter() - t0
    grid = np.random.default_rng(0).integers(0, 1000, size=(8, 8))
    t0 = time.perf_counter()
    for _ in items:
        await runner.vq.decode([grid])
    decode = time.perf_counter() - t0
    return {"engine_loop_s": round(seq, 2), "engine_concurrent_s": round(par, 2),
            "engine_gain": round(seq / par, 2), "vq_decode_s_per_image": round(decode / len(items), 3)}


async def emu35_part(tiny: Path, work: Path, n: int) -> dict:
    cfg = write_release_config(work / "bench_t2i.py", [f"a picture of thing {i}" for i in range(n)],
                               save_path="out", image_area=AREA, extra="target_height, target_width = 64, 64")
    job = read_release_config(cfg, cwd=work)
    items = [e for e in job.entries if isinstance(e, Item)]
    settings = load_settings(["--demo", "--max-concurrent", str(CONCURRENT)]).with_demo_defaults(tiny)
    async with started_runner(settings, image_area=AREA) as runner:
        await release_loop(runner, items[:2], work / "warmup")
        loop_s = await release_loop(runner, items, work / "loop")
        out = work / "batch"
        todo, summary = plan_batch(items, out)
        t0 = time.perf_counter()
        await run_batch(runner, todo, out, summary, CONCURRENT, LogProgress(len(todo), quiet=True))
        batch_s = time.perf_counter() - t0
        parts = await engine_only(runner, items)
    assert summary.count("ok") == n, summary.to_json()
    tokens = {r.tokens for r in summary.results.values()}
    return {"loop_s": round(loop_s, 2), "batch_s": round(batch_s, 2), "tokens_per_prompt": sorted(tokens),
            "gain": round(loop_s / batch_s, 2), **parts}


async def main_async(args) -> dict:
    tiny = ensure_tiny()
    tok = Emu35Tokenizer.from_dir(tiny / "tokenizer")
    setup = Setup(tiny / "model", tiny / "tokenizer", "cpu", "float32", (1, CONCURRENT))
    plain = await plain_part(setup, tok, args.repeats)
    plain_gain = CONCURRENT * plain["one_pair_step_ms"] / plain["step_ms"]
    with tempfile.TemporaryDirectory(prefix="emu35-bench-batch-") as work:
        emu = await emu35_part(tiny, Path(work), args.prompts)
    return {
        "prompts": args.prompts, "max_concurrent": CONCURRENT,
        "release_loop_s": emu["loop_s"], "batch_command_s": emu["batch_s"],
        "batch_gain": emu["gain"], "plain_vllm_gain_8_vs_1": round(plain_gain, 2),
        "share_of_plain_vllm_gain": round(emu["gain"] / plain_gain, 3),
        "tokens_per_prompt": emu["tokens_per_prompt"],
        # the breakdown: the engine's own gain (no decoding) and the serial VQ decode per image
        "engine_only_gain": emu["engine_gain"],
        "engine_only_share_of_plain_vllm_gain": round(emu["engine_gain"] / plain_gain, 3),
        "vq_decode_s_per_image": emu["vq_decode_s_per_image"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="plain vLLM timing repeats (median; 1 is too noisy)")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    report = asyncio.run(main_async(args))
    text = json.dumps(report, indent=2)
    print("BATCH BENCH " + text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
