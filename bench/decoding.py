#!/usr/bin/env python3
"""Decoding schedules benchmark (not a test; one run): what ``ar``, ``jacobi``, ``zipar`` and ZipAR rows
drafted with Jacobi cost and what they change, on the native engine.

For T2I and X2I at 16×16 and 32×32 tokens, each schedule draws the same prompts with the same seeds, one
request at a time (the latency of one image), and the table gives per image:

* **passes**: the forward passes that chose the answer's tokens (``decode_steps``, the header included);
* **tokens/pass**: the answer's tokens over its passes (1 for ``ar``);
* **s/image**: wall seconds from request to last token on this machine (CPU unless ``--device``);
* **= ar**: the fraction of image cells equal to ``ar``'s image with the same seed (1.000 for a lossless
  schedule under greedy decoding; under sampling a lossless schedule keeps the distribution, not the ids);
* **checker**: how many images pass the demo model's shape checker, next to ``ar``'s count, when a checker
  is found (see :func:`load_checker`): the damage an approximate schedule (``zipar`` with a window below
  the row width) does.

Then what the schedules' formulas give for the real model's 1024² grid (55×73 tokens, 4,077 tokens by
``ar``): ZipAR's exact pass count per window, and Jacobi's estimated from this model's measured tokens per
pass (acceptance depends on the model, so that row says which model it was measured on).

    python bench/decoding.py                      # today's tiny model, CPU
    python bench/decoding.py --model DIR --vq-model DIR --device cuda:0 --seeds 8 --json out.json

Without ``--model`` the model is the cached tiny one, and the output says so.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from service.prompts import Task  # noqa: E402
from service.task import GenerationOptions, plan_request  # noqa: E402
from service.task.planner import image_token_count  # noqa: E402
from service.token_layout import ImageDone, StreamParser  # noqa: E402
from service.tokenizer import Emu35Tokenizer  # noqa: E402
from service.types import Decoding, GenerationRequest  # noqa: E402

#: The real model's default 1024² grid (rows × columns of tokens) and what ``ar`` pays for it.
REAL_GRID = (55, 73)
#: ZipAR windows measured (the engine's default is added), and the combination's draft length and window.
WINDOWS = (4, 8)
COMBO_DRAFT, COMBO_WINDOW = 4, 8
PROMPTS = {Task.T2I: "a red circle on a blue background", Task.X2I: "make the circle red"}

#: Where the demo model's shape checker may live (branch ``demo``); the first importable one is used. A
#: checker is ``check(image: PIL.Image, prompt: str, reference: PIL.Image | None) -> bool``.
CHECKER_CANDIDATES = (("tests.shape_checker", "check_image"), ("tests.demo_checker", "check_image"),
                      ("service.tiny.shapes", "check_image"))


def load_checker() -> tuple[Callable[..., bool] | None, str]:
    """The demo model's shape checker and where it came from, or (None, why not)."""
    for module, name in CHECKER_CANDIDATES:
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        return fn, f"{module}.{name}"
    return None, "no shape checker on this branch (add its module to CHECKER_CANDIDATES in bench/decoding.py)"


@dataclass(frozen=True)
class Case:
    label: str
    decoding: Decoding


def schedules(default_window: int | None, default_draft: int | None) -> list[Case]:
    windows = sorted(set(WINDOWS) | ({default_window} if default_window else set()))
    cases = [Case("ar", Decoding("ar")),
             Case(f"jacobi L={default_draft or 'default'}", Decoding("jacobi"))]
    cases += [Case(f"zipar w={w}", Decoding("zipar", window=w)) for w in windows]
    cases.append(Case(f"zipar w={COMBO_WINDOW} + jacobi L={COMBO_DRAFT}",
                      Decoding("zipar", draft_len=COMBO_DRAFT, window=COMBO_WINDOW)))
    return cases


def native_defaults() -> tuple[int | None, int | None, Any]:
    """The native engine's default window and draft length and its schedule module (None where absent)."""
    try:
        sched = importlib.import_module("service.engine.native.schedule")
    except ImportError:
        return None, None, None
    return getattr(sched, "DEFAULT_WINDOW", None), getattr(sched, "DEFAULT_DRAFT_LEN", None), sched


def reference_image(px: int) -> Image.Image:
    """The X2I input: a blue circle on white (what the demo model's recolour prompts expect)."""
    im = Image.new("RGB", (px, px), (255, 255, 255))
    ImageDraw.Draw(im).ellipse((px // 4, px // 4, 3 * px // 4, 3 * px // 4), fill=(0, 0, 255))
    return im


@dataclass
class Run:
    passes: int
    tokens: int
    seconds: float
    codes: np.ndarray | None


async def draw(engines: "Engines", tok: Emu35Tokenizer, make) -> Run:
    """One image: the request ``make(max_model_len)`` on the engine, start to last token."""
    engine = engines.get()
    req = make(engine.max_model_len)
    parser = StreamParser(tok)
    codes = None
    passes = tokens = 0
    try:
        t0 = time.perf_counter()
        engine.check(req)
        async for delta in engine.generate(req):
            passes += delta.steps
            tokens += len(delta.token_ids)
            events = parser.feed(delta.token_ids)
            if delta.finished:
                events += parser.finish() if not parser.ended else []
            for ev in events:
                if isinstance(ev, ImageDone):
                    codes = np.asarray(ev.codes)
            if delta.finished:
                break
        seconds = time.perf_counter() - t0
    finally:
        engines.done()
    return Run(passes, tokens, seconds, codes)


class Engines:
    """The native engine, one for the whole run, or a fresh one per image (``fresh``: start-up is not
    timed; a way round an engine that cannot run a second request after a long one)."""

    def __init__(self, build, fresh: bool) -> None:
        self.build, self.fresh = build, fresh
        self.engine = None

    def get(self):
        if self.engine is None:
            self.engine = self.build()
            self.engine.start()
        return self.engine

    def done(self) -> None:
        if self.fresh:
            self.close()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def request(tok: Emu35Tokenizer, task: Task, grid: int, seed: int, decoding: Decoding, refs: list[np.ndarray],
            greedy: bool, tag: str, max_model_len: int) -> GenerationRequest:
    from dataclasses import replace

    from service.types import SamplingSettings

    image = SamplingSettings(1, 1.0, 1.0) if greedy else None
    req = plan_request(tok, task, PROMPTS[task], refs,
                       GenerationOptions(size=f"{16 * grid}x{16 * grid}", seed=seed, image=image), tag,
                       max_model_len=max_model_len)
    return replace(req, decoding=decoding)


async def measure(args, tok: Emu35Tokenizer, engines: Engines, vq, checker) -> dict:
    default_window, default_draft, _ = native_defaults()
    cases = schedules(default_window, default_draft)
    rows: list[dict] = []
    for task in args.tasks:
        for grid in args.grids:
            ref_im = reference_image(16 * grid)
            refs = vq.encode([ref_im], (16 * grid) ** 2) if (task is Task.X2I and vq is not None) else \
                [np.full((grid, grid), 7, dtype=np.int64)] if task is Task.X2I else []
            await draw(engines, tok, partial(request, tok, task, grid, 0, Decoding("ar"), refs, args.greedy, "warmup"))
            ar_codes: dict[int, np.ndarray | None] = {}
            for case in cases:
                runs = []
                for seed in range(args.seeds):
                    tag = f"{task.value}-{grid}-{case.label}-{seed}"
                    run = await draw(engines, tok, partial(request, tok, task, grid, seed, case.decoding, refs,
                                                           args.greedy, tag))
                    runs.append(run)
                    if case.decoding.mode == "ar":
                        ar_codes[seed] = run.codes
                same = [float(np.mean(r.codes == ar_codes[s])) for s, r in enumerate(runs)
                        if r.codes is not None and ar_codes.get(s) is not None and r.codes.shape == ar_codes[s].shape]
                passed = None
                if checker is not None and vq is not None:
                    images = vq.decode([r.codes for r in runs if r.codes is not None])
                    passed = sum(bool(checker(im, PROMPTS[task], ref_im if task is Task.X2I else None))
                                 for im in images)
                row = {"task": task.value, "grid": f"{grid}x{grid}", "schedule": case.label,
                       "passes": float(np.mean([r.passes for r in runs])),
                       "tokens_per_pass": float(np.mean([r.tokens / r.passes for r in runs])),
                       "seconds_per_image": float(np.mean([r.seconds for r in runs])),
                       "same_as_ar": float(np.mean(same)) if same else None,
                       "checker_passed": passed, "images": len(runs)}
                rows.append(row)
                print_row(row, flush=True)
    return {"rows": rows}


def real_grid(rows: list[dict]) -> list[dict]:
    """What the formulas give for the real 55×73 grid: ``ar`` and ZipAR exactly, Jacobi from this model's
    measured body tokens per pass at the largest grid measured."""
    h, w = REAL_GRID
    total = image_token_count(h, w)
    header = total - h * (w + 1)
    default_window, _, sched = native_defaults()
    out = [{"schedule": "ar", "passes": total, "how": "one per token"}]
    windows = sorted(set(WINDOWS) | ({default_window} if default_window else set()))
    for win in windows:
        body = sched.zipar_passes(h, w, win) if sched is not None and hasattr(sched, "zipar_passes") else \
            (h - 1) * min(win, w) + w
        out.append({"schedule": f"zipar w={win}", "passes": header + body,
                    "how": "header (7, one per pass) + (H−1)·min(w, W) + W"})
    big = [r for r in rows if r["task"] == "t2i"]
    if big:
        largest = max(int(r["grid"].split("x")[0]) for r in big)
        at = {r["schedule"]: r for r in big if r["grid"] == f"{largest}x{largest}"}
        for label, r in at.items():
            if label.startswith("jacobi") or "+ jacobi" in label:
                g = largest
                base = image_token_count(g, g) if label.startswith("jacobi") else \
                    at.get(f"zipar w={COMBO_WINDOW}", {}).get("passes")
                if not base:
                    continue
                speedup = base / r["passes"]  # this model's: over ar (jacobi) or over the same zipar window
                ref = total if label.startswith("jacobi") else next(
                    (o["passes"] for o in out if o["schedule"] == f"zipar w={COMBO_WINDOW}"), None)
                if ref:
                    out.append({"schedule": label, "passes": round(ref / speedup),
                                "how": f"estimate: this model's {speedup:.2f}× at {g}×{g} applied to the real grid"})
    return out


def print_row(r: dict, flush: bool = False) -> None:
    same = "" if r["same_as_ar"] is None else f"{r['same_as_ar']:.3f}"
    checker = "" if r["checker_passed"] is None else f"{r['checker_passed']}/{r['images']}"
    print(f"| {r['task']} | {r['grid']} | {r['schedule']} | {r['passes']:.0f} | {r['tokens_per_pass']:.2f} | "
          f"{r['seconds_per_image']:.2f} | {same} | {checker} |", flush=flush)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an Emu3 checkpoint (default: the cached tiny model)")
    ap.add_argument("--tokenizer", type=Path, help="default: --model's folder, or the tiny tokenizer")
    ap.add_argument("--vq-model", type=Path, help="the VQ (default: the tiny one; needed for X2I and the checker)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per schedule, task and grid")
    ap.add_argument("--grids", default="16,32", help="square grids in tokens")
    ap.add_argument("--tasks", default="t2i,x2i", help="t2i, x2i or both")
    ap.add_argument("--greedy", action="store_true", help="greedy image tokens (default: the task's sampling)")
    ap.add_argument("--fresh-engine", action="store_true", help="a new engine per image (start-up not timed)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.grids = [int(g) for g in args.grids.split(",")]
    args.tasks = [Task(t) for t in args.tasks.split(",")]

    try:
        from service.engine.native import AsyncNativeEngine
    except ImportError:
        print("the native engine (service/engine/native) is not on this branch yet", file=sys.stderr)
        return 2
    if args.model is None:
        from service.tiny.make import ensure_tiny

        tiny = ensure_tiny()
        model, tok_dir, vq_dir = tiny / "model", tiny / "tokenizer", args.vq_model or tiny / "vq"
        label = f"today's tiny model ({tiny.name}: a 2-layer toy from service/tiny, not the demo shape model)"
    else:
        model, tok_dir, vq_dir = args.model, args.tokenizer or args.model, args.vq_model
        label = str(args.model)
    tok = Emu35Tokenizer.from_dir(tok_dir)
    vq = None
    if vq_dir is not None:
        from service.vq import VisionTokenizer

        vq = VisionTokenizer.from_pretrained(vq_dir, device="cpu", dtype="float32")
    checker, where = load_checker()
    longest = 2 * max(args.grids) * (max(args.grids) + 1) + 1024  # room for an X2I reference and its answer
    engines = Engines(lambda: AsyncNativeEngine(model, tok, args.device, args.dtype, longest, 1), args.fresh_engine)
    sampling = "greedy" if args.greedy else "the task's default image sampling"
    fresh = "; a fresh engine per image" if args.fresh_engine else ""
    print(f"model: {label}\ndevice: {args.device}; {args.seeds} seeds per cell; {sampling}{fresh}; checker: {where}\n")
    print("| task | grid | schedule | passes | tokens/pass | s/image | = ar | checker |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    try:
        result = asyncio.run(measure(args, tok, engines, vq, checker))
    finally:
        engines.close()
    result["real_grid"] = real_grid(result["rows"])
    h, w = REAL_GRID
    print(f"\nthe real 1024² grid ({h}×{w} tokens): passes per image by formula")
    print("| schedule | passes | how |\n|---|---:|---|")
    for r in result["real_grid"]:
        print(f"| {r['schedule']} | {r['passes']} | {r['how']} |")
    result.update(model=label, device=args.device, seeds=args.seeds, sampling=sampling, checker=where)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
