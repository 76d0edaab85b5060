#!/usr/bin/env python3
"""Cost of one Emu3.5 decoding step (``rules.next_tokens``: CFG, masks, forced tokens, top-k sampling)
on a device, next to what a sampler does anyway — no vLLM needed, so it runs on any GPU/NPU box.

For 2 and 16 rows (1 and 8 guided pairs) over the real 282,926-token vocabulary, all rows drawing
pixels (T2I), it reports milliseconds per step for: ``argmax`` (greedy floor), ``topk_sample`` (top-k
5120 + temperature + draw: what any sampler with the image settings does), and ``next_tokens``.

    python bench/processor_step.py --device cuda:0 [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.policy.rules import PIXELS, Guidance, RowState, SamplingColumns, VocabTables, next_tokens, sample  # noqa: E402

VOCAB, FIRST_VISUAL = 282_926, 151_854


def timed(fn, device: torch.device, iters: int) -> float:
    for _ in range(5):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - t0) / iters


def run(rows: int, device: torch.device, iters: int) -> dict:
    tables = VocabTables.build(vocab_size=VOCAB, first_visual=FIRST_VISUAL, boi=151852, img=151851, eoi=151853,
                               eol=151846, star=9, digit_ids=range(15, 25), never=(151643,), device=device)
    base = torch.randn(rows, VOCAB, device=device)
    state = RowState.empty(rows, device)
    state.mode[:] = PIXELS
    state.img_h[:] = 64
    state.img_w[:] = 64
    state.k[:] = 7
    guidance = Guidance(torch.arange(0, rows, 2, device=device), torch.arange(1, rows, 2, device=device),
                        torch.full((rows // 2,), 2.0, device=device))

    def cols(k, p, t):
        return SamplingColumns(torch.full((rows,), k, device=device), torch.full((rows,), p, device=device),
                               torch.full((rows,), t, device=device))

    text, image = cols(1024, 0.9, 1.0), cols(5120, 1.0, 1.0)
    gens = [torch.Generator(device).manual_seed(i) if i % 2 == 0 else None for i in range(rows)]
    fallback = torch.Generator(device).manual_seed(0)
    work = base.clone()
    visual = slice(FIRST_VISUAL, VOCAB)

    def step():
        work.copy_(base)
        return next_tokens(work, state, tables, guidance, text, image, 5120, gens, [5120] * rows, fallback,
                           columns=visual)

    def plain_sample():
        work.copy_(base)
        return sample(work, image.top_k, image.top_p, image.temperature, 5120, (), (), fallback)

    copy_ms = timed(lambda: work.copy_(base), device, iters)
    return {
        "rows": rows,
        "argmax_ms": round(timed(lambda: base.argmax(-1), device, iters), 3),
        "topk_sample_ms": round(timed(plain_sample, device, iters) - copy_ms, 3),
        "next_tokens_ms": round(timed(step, device, iters) - copy_ms, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "steps": [run(r, device, args.iters) for r in (2, 16)]}
    print("PROCESSOR STEP " + json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
