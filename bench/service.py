"""Service overhead: time a request spends outside the engine and the VQ worker (validation, prompt,
parsing, record, PNG, JSON, HTTP) for a 1024×1024 output, and time to the first SSE event.

The engine is replaced by one that replays a fixed 64×64-token image instantly (so engine time is
~0 and measured), the VQ worker is the real one on the tiny IBQ checkpoint (its time is read from the
service's own ``emu35_vq_*`` histograms), and requests go over a real socket to uvicorn. Everything
is reported as shares of the request's wall time, measured in one run.

    python bench/service.py [--requests 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import AsyncGenerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from service.server.app import create_app  # noqa: E402
from service.server.core.runtime import Runtime  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.tiny.make import ensure_tiny  # noqa: E402
from service.token_layout import image_ids  # noqa: E402
from service.types import (  # noqa: E402
    EngineStats,  # noqa: E402
    GenerationRequest,
    TokenDelta,
)

GRID = 64  # 1024 px / 16


class ReplayEngine:
    """Answers every request with the same image's ids, one row per delta, without computing anything."""

    def __init__(self, tokenizer) -> None:
        rng = np.random.default_rng(0)
        self.ids = [tokenizer.ids.boi] + image_ids(tokenizer, rng.integers(0, 131072, (GRID, GRID)))[1:]
        self.seconds = 0.0
        self.max_model_len = 32768

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    async def self_check(self) -> None: ...

    async def health(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0.0, 0, 0, 0)

    def check(self, req: GenerationRequest) -> None: ...

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        step = GRID + 1
        for at in range(0, len(self.ids), step):
            t0 = time.perf_counter()
            chunk = self.ids[at:at + step]
            last = at + step >= len(self.ids)
            self.seconds += time.perf_counter() - t0
            yield TokenDelta(chunk, "stop" if last else None)
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None: ...


def vq_seconds(client: httpx.Client) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            if s.name in ("emu35_vq_decode_seconds_sum", "emu35_vq_encode_seconds_sum"):
                total += s.value
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--port", type=int, default=8391)
    args = ap.parse_args()

    tiny = ensure_tiny()
    settings = Settings(demo=True, port=args.port, log_level="warning").with_demo_defaults(tiny)
    settings = settings.model_copy(update={"max_model_len": 32768})
    engines: list[ReplayEngine] = []

    def factory(s, tok):
        engines.append(ReplayEngine(tok))
        return engines[-1]

    runtime = Runtime(settings, engine_factory=factory)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, runtime), host="127.0.0.1", port=args.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{args.port}"
    with httpx.Client(base_url=url, timeout=600) as client:
        while True:
            try:
                if client.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        body = {"prompt": "a lighthouse at dawn", "size": "1024x1024", "seed": 1}
        client.post("/v1/t2i", json=body)  # warm-up (first decode allocates)
        rows = []
        for _ in range(args.requests):
            vq0, eng0 = vq_seconds(client), engines[0].seconds
            t0 = time.perf_counter()
            r = client.post("/v1/t2i", json=body)
            wall = time.perf_counter() - t0
            r.raise_for_status()
            vq, eng = vq_seconds(client) - vq0, engines[0].seconds - eng0
            rows.append((wall, vq, eng, len(r.content)))
        out = r.json()
        assert out["images"][0]["width"] == 1024

        # where the outside time goes, measured on the same image and record
        import io

        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(out["images"][0]["b64_json"]))).convert("RGB")
        from service.record import RecordImage, build_story
        from service.server.core.image_io import encode_image

        t = time.perf_counter()
        encode_image(image, "png")
        png_s = time.perf_counter() - t
        t = time.perf_counter()
        build_story("q", [], [RecordImage(image)], "s").SerializeToString()
        rec_s = time.perf_counter() - t
        t = time.perf_counter()
        json.dumps(out)
        json_s = time.perf_counter() - t

        firsts = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            with client.stream("POST", "/v1/t2i", json={**body, "stream": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("event:"):
                        firsts.append(time.perf_counter() - t0)
                        break
    server.should_exit = True
    thread.join(30)

    wall = statistics.median(r[0] for r in rows)
    vq = statistics.median(r[1] for r in rows)
    eng = statistics.median(r[2] for r in rows)
    outside = wall - vq - eng
    print(f"1024×1024 T2I over HTTP, median of {args.requests} (replayed engine, tiny VQ on CPU):")
    print(f"  wall {wall * 1000:.0f} ms = VQ decode {vq * 1000:.0f} ms + engine {eng * 1000:.1f} ms "
          f"+ outside {outside * 1000:.0f} ms ({outside / wall:.1%} of wall)")
    print(f"  of the outside time, measured alone: PNG encode at level 1 {png_s * 1000:.0f} ms (streamed images only; "
          f"the JSON answer reuses the record's PNG), record build incl. PNG {rec_s * 1000:.0f} ms, "
          f"JSON {json_s * 1000:.1f} ms; response {rows[-1][3] / 1e6:.1f} MB")
    print(f"  time to first SSE event: median {statistics.median(firsts) * 1000:.1f} ms "
          f"(min {min(firsts) * 1000:.1f}, max {max(firsts) * 1000:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
