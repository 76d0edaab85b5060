"""Preview fairness: how much a stream asking for previews as often as it may slows a plain request.

A plain T2I request is timed three ways, interleaved, in one run against one server:

- alone;
- beside a T2I stream without previews;
- beside the same stream with ``preview_every_rows: 1``, the smallest interval the API takes (the
  service still decodes at most ``MAX_PREVIEWS_PER_IMAGE`` previews per image).

The plain request starts once the stream is drawing rows, and the stream is closed (its pair aborted)
when the plain request is done. Reported: medians and their ratios. "previews / stream" is what the
previews cost the other request — the VQ worker's fairness (final images before previews, a cap on
previews). "stream / alone" is what sharing the engine with any second generation costs; no preview
policy changes it (on two CPU cores the engine's steps grow with the batch).

    python bench/preview_fairness.py [--repeats 5] [--plain-size 256x256] [--stream-size 512x512] [--url URL]

Without ``--url`` it starts ``serve --demo`` (vLLM where installed) on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from httpx_sse import connect_sse  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

#: The smallest preview interval the API accepts (``preview_every_rows`` has ge=1).
SMALLEST_PREVIEW_INTERVAL = 1


@dataclass
class Fairness:
    """Seconds of the plain request in each setting, one entry per repetition."""

    plain_size: str
    stream_size: str
    alone: list[float] = field(default_factory=list)
    beside_stream: list[float] = field(default_factory=list)
    beside_previews: list[float] = field(default_factory=list)
    previews_during: list[int] = field(default_factory=list)  # previews the stream got while the request ran

    @property
    def previews_vs_stream(self) -> float:
        """What the previews cost the plain request: the criterion (at most 1.25)."""
        return statistics.median(self.beside_previews) / statistics.median(self.beside_stream)

    @property
    def previews_vs_alone(self) -> float:
        return statistics.median(self.beside_previews) / statistics.median(self.alone)

    @property
    def stream_vs_alone(self) -> float:
        return statistics.median(self.beside_stream) / statistics.median(self.alone)

    def report(self) -> str:
        med = statistics.median
        return "\n".join([
            f"plain T2I {self.plain_size} beside a T2I stream {self.stream_size}, {len(self.alone)} repetitions "
            f"(medians):",
            f"  alone                                  {med(self.alone):6.2f} s",
            f"  beside the stream, no previews         {med(self.beside_stream):6.2f} s",
            f"  beside the stream, preview_every_rows 1 {med(self.beside_previews):5.2f} s "
            f"({med(self.previews_during):.0f} previews decoded meanwhile)",
            f"  previews / stream  {self.previews_vs_stream:.2f}   (what the previews cost; criterion <= 1.25)",
            f"  stream / alone     {self.stream_vs_alone:.2f}   (what a second generation costs on this machine)",
            f"  previews / alone   {self.previews_vs_alone:.2f}",
        ])


def _timed_plain(client: httpx.Client, size: str, seed: int) -> float:
    started = time.perf_counter()
    r = client.post("/v1/t2i", json={"prompt": "a small red house", "size": size, "seed": seed})
    r.raise_for_status()
    return time.perf_counter() - started


#: Seconds to let a decode the VQ worker had already started finish after a stream is closed (an aborted
#: stream's preview still runs to its end; its queue is empty by then).
SETTLE_SECONDS = 0.5


def _idle(client: httpx.Client, within: float = 30.0) -> None:
    """Wait until no pair runs or waits and no VQ job is queued (an aborted stream frees its pair within
    moments), then let a decode already running end."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        values = {s.name: s.value for fam in text_string_to_metric_families(client.get("/metrics").text)
                  for s in fam.samples}
        if not any(values.get(n) for n in ("emu35_running_pairs", "emu35_waiting_pairs", "emu35_vq_queue_depth")):
            time.sleep(SETTLE_SECONDS)
            return
        time.sleep(0.05)
    raise TimeoutError("the service did not go idle")


@contextlib.contextmanager
def _stream_drawing(client: httpx.Client, size: str, every_rows: int | None) -> Iterator[list[int]]:
    """A T2I stream running in a thread, entered once it draws rows; yields a one-item list counting the
    previews received while the block runs; closed (its pair aborted) on leaving the block."""
    drawing, stop, counting = threading.Event(), threading.Event(), threading.Event()
    previews = [0]
    failure: list[BaseException] = []
    body: dict = {"prompt": "a long river through a valley", "size": size, "seed": 1, "stream": True}
    if every_rows is not None:
        body["preview_every_rows"] = every_rows

    def run() -> None:
        try:
            with connect_sse(client, "POST", "/v1/t2i", json=body) as source:
                for sse in source.iter_sse():
                    if sse.event == "image_progress":
                        drawing.set()
                        if counting.is_set() and "b64_json" in json.loads(sse.data):
                            previews[0] += 1
                    if stop.is_set() or sse.event in ("done", "error"):
                        return
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failure.append(exc)
        finally:
            drawing.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    drawing.wait(60)
    if failure:
        raise failure[0]
    counting.set()
    try:
        yield previews
    finally:
        counting.clear()
        stop.set()
        thread.join(60)


def measure(url: str, headers: dict[str, str] | None = None, plain_size: str = "256x256",
            stream_size: str = "512x512", repeats: int = 5) -> Fairness:
    """Time the plain request alone, beside a stream and beside a stream with previews (see the module)."""
    out = Fairness(plain_size, stream_size)
    with httpx.Client(base_url=url, headers=headers or {}, timeout=300) as client:
        _idle(client)
        _timed_plain(client, plain_size, 0)  # warm-up
        for rep in range(repeats):
            settings = [("alone", None), ("stream", None), ("previews", SMALLEST_PREVIEW_INTERVAL)]
            for name, every in settings[rep % 3:] + settings[:rep % 3]:  # rotated: no setting always goes first
                _idle(client)
                if name == "alone":
                    out.alone.append(_timed_plain(client, plain_size, rep))
                    continue
                with _stream_drawing(client, stream_size, every) as previews:
                    seconds = _timed_plain(client, plain_size, rep)
                    seen = previews[0]
                (out.beside_stream if every is None else out.beside_previews).append(seconds)
                if every is not None:
                    out.previews_during.append(seen)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--plain-size", default="256x256")
    ap.add_argument("--stream-size", default="512x512")
    ap.add_argument("--url", help="an already running service (default: start serve --demo)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = ap.parse_args()

    def run(url: str) -> Fairness:
        return measure(url, plain_size=args.plain_size, stream_size=args.stream_size, repeats=args.repeats)

    if args.url:
        result = run(args.url)
    else:
        from tests.serverproc import running_server

        with tempfile.TemporaryDirectory() as tmp, running_server(["--demo"], Path(tmp) / "server.log") as server:
            result = run(server.url)
    print(result.report())
    if args.json:
        print(json.dumps({**result.__dict__, "previews_vs_stream": result.previews_vs_stream,
                          "stream_vs_alone": result.stream_vs_alone, "previews_vs_alone": result.previews_vs_alone}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
