#!/usr/bin/env python3
"""Cost of one Emu3.5 decoding step (``rules.next_tokens``: CFG, masks, forced tokens, top-k sampling)
on a device, next to what a sampler does anyway — no vLLM needed, so it runs on any GPU/NPU box.

For 2, 16 and 64 rows (1, 8, 32 guided pairs) over the real 282,926-token vocabulary, all rows drawing
pixels (T2I), it reports milliseconds per step for: ``argmax`` (greedy floor), ``topk_sample`` (top-k
5120 + temperature + draw: what any sampler with the image settings does), ``next_tokens``, and for the
vLLM logits processor (needs vLLM) its batch update (all rows added) and a whole step (fold the new
tokens, rules, sampling), both ``before`` (bench/processor_before.py: device tensors built from Python
lists) and ``after`` (service/engine/in_vllm/processor.py: pinned mirrors, non-blocking copies), in one run.

    python bench/processor_step.py --device cuda:0 [--iters 200] [--rows 2 16 64] [--vocab 282926]
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
BOI, IMG, EOI, EOL, STAR, PAD = 151852, 151851, 151853, 151846, 9, 151643


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


def vocab_tables(device: torch.device, vocab: int) -> VocabTables:
    return VocabTables.build(vocab_size=vocab, first_visual=FIRST_VISUAL, boi=BOI, img=IMG, eoi=EOI,
                             eol=EOL, star=STAR, digit_ids=range(15, 25), never=(PAD,), device=device)


def run(rows: int, device: torch.device, iters: int, vocab: int = VOCAB) -> dict:
    VOCAB = vocab  # noqa: N806 (the module constant, narrowed for a quick CPU run)
    tables = vocab_tables(device, vocab)
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


def processor_steps(cls, rows: int, device: torch.device, iters: int, vocab: int) -> dict:
    """Batch update (``rows`` rows of T2I pairs added) and whole steps of one processor class, every row
    drawing pixels of a 64x64 image, one new token per row per step (as vLLM feeds it)."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from service.engine.policy.pairing import COND, UNCOND, RowSpec
    from service.types import SamplingSettings

    tables = vocab_tables(device, vocab)
    image, text = SamplingSettings(5120, 1.0, 1.0), SamplingSettings(1024, 0.9, 1.0)

    def added(outs):
        return [(i, SamplingParams(extra_args=RowSpec(f"p{i // 2}", (COND, UNCOND)[i % 2], 2.0, text, image, (64, 64),
                                                      i if i % 4 == 0 else None).to_extra()), [1], outs[i])
                for i in range(rows)]

    pin = device.type == "cuda"
    header = [BOI, 15 + 6, 15 + 4, STAR, 15 + 6, 15 + 4, IMG]

    def fresh():
        proc = cls.for_tables(tables, PAD, max_rows=max(rows, 2), device=device, **({"pin": pin} if pin else {}))
        outs = [list(header) for _ in range(rows)]
        return proc, outs

    def update():
        proc, outs = fresh()
        proc.update_state(BatchUpdate(batch_size=rows, removed=[], added=added(outs), moved=[]))

    proc, outs = fresh()
    proc.update_state(BatchUpdate(batch_size=rows, removed=[], added=added(outs), moved=[]))
    base = torch.randn(rows, vocab, device=device)
    work = base.clone()
    proc.apply(work)  # folds the header: every row is in the pixels now

    def step():
        for o in outs:
            o.append(FIRST_VISUAL + 1)
        work.copy_(base)
        proc.update_state(None)
        return proc.apply(work)

    make_ms = timed(fresh, device, max(3, iters // 10))
    return {"batch_update_ms": round(timed(update, device, max(3, iters // 10)) - make_ms, 3),
            "step_ms": round(timed(step, device, iters), 3)}


def processor_report(rows: int, device: torch.device, iters: int, vocab: int) -> dict:
    """Before and after, measured in the same run (ratios are what to read)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from processor_before import Emu35LogitsProcessor as Before

    from service.engine.in_vllm.processor import Emu35LogitsProcessor as After

    before = processor_steps(Before, rows, device, iters, vocab)
    after = processor_steps(After, rows, device, iters, vocab)
    return {"rows": rows, "before": before, "after": after,
            "step_after_over_before": round(after["step_ms"] / before["step_ms"], 3),
            "update_after_over_before": round(after["batch_update_ms"] / max(before["batch_update_ms"], 1e-6), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 16, 64])
    ap.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size (smaller: a quick CPU run)")
    ap.add_argument("--no-processor", action="store_true", help="skip the vLLM processor (no vLLM installed)")
    args = ap.parse_args()
    device = torch.device(args.device)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "vocab": args.vocab, "steps": [run(r, device, args.iters, args.vocab) for r in args.rows]}
    if not args.no_processor:
        report["processor"] = [processor_report(r, device, args.iters, args.vocab) for r in args.rows]
    print("PROCESSOR STEP " + json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
