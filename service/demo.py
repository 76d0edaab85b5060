"""``serve --demo``: the built-in tiny model end to end.

Until the HTTP layer lands this runs the core pipeline once per task (T2I and a visual narrative) on the
cached tiny checkpoints with the reference engine on CPU, and writes each generation's ``.pb`` record
and its visualisation under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m service serve", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="serve the built-in tiny model (built once, cached)")
    parser.add_argument("--output-dir", default="demo-output", help="where records and pictures are written")
    parser.add_argument("--prompt", default="a little robot draws a picture of the city")
    args = parser.parse_args(argv)
    if not args.demo:
        parser.error("the HTTP server is not part of this build yet; run with --demo to exercise the core")

    from service.engine.reference import ReferenceEngine
    from service.generation import GenerationOptions, generate
    from service.record.visualise import write_story
    from service.tiny.make import ensure_tiny
    from service.tokenizer import Emu35Tokenizer
    from service.vq import VisionTokenizer

    started = time.monotonic()
    tiny = ensure_tiny()
    print(f"tiny checkpoints ready in {tiny} ({time.monotonic() - started:.1f}s)")
    tok = Emu35Tokenizer.from_dir(tiny / "tokenizer")
    engine = ReferenceEngine(tiny / "model", tok)
    vq = VisionTokenizer.from_pretrained(tiny / "vq")
    out = Path(args.output_dir)
    for task, size in (("t2i", "256x256"), ("story", None)):
        t0 = time.monotonic()
        result = generate(engine, vq, tok, task, args.prompt, options=GenerationOptions(size=size, seed=6666),
                          request_id=f"demo-{task}")
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{result.request.request_id}.pb").write_bytes(result.story.SerializeToString())
        files = write_story(result.story, folder / "vis")
        kinds = ", ".join(type(s).__name__.replace("Segment", "") for s in result.segments)
        print(f"{task}: {len(result.ids)} tokens [{kinds}] in {time.monotonic() - t0:.1f}s → {folder} "
              f"({len(files)} files)")
    return 0
