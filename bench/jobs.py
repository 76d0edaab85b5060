#!/usr/bin/env python3
"""Durable-jobs benchmark (not a test), two figures in one run:

1. the job path's overhead against the synchronous route: the same seeded 128×128 T2I requests on the
   tiny model (reference engine, one slot), each sent once synchronously and once as a job (submit with
   ``Prefer: respond-async``, follow ``/events`` to its end, read the job), alternating (each path first
   half the time) so drift and order cancel; the figure is total job time / total synchronous time − 1
   (goal ≤ 5 %), with each path's generation time (from its answer's ``timings``) beside it, which tells
   the cost around the engine from a slower engine;
2. the store's own rate: claims + completions per second on PostgreSQL with two replicas (two workers,
   each with its own connection pool and 8 slots) and an instant stand-in engine, over thousands of
   queued jobs — to show the store is not what limits a deep queue.

Ratios, not absolute numbers, are what carry over between machines. Run with ``make bench-jobs`` or

    .venv/bin/python bench/jobs.py [--requests 16] [--jobs 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from httpx_sse import connect_sse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.jobs import JobReporter, JobRow, JobWorker, NewJob, WorkerConfig, open_store  # noqa: E402
from tests.pgcluster import fresh_database, postgres_cluster  # noqa: E402
from tests.serverproc import running_server  # noqa: E402

BODY = {"prompt": "a lighthouse at dusk", "size": "128x128", "image_area": 128 * 128}


def _synchronous(http: httpx.Client, body: dict) -> tuple[float, float]:
    """(wall seconds, the generation's own seconds) of one synchronous request."""
    t = time.perf_counter()
    answer = http.post("/v1/t2i", json=body)
    wall = time.perf_counter() - t
    assert answer.status_code == 200, answer.text
    return wall, answer.json()["timings"]["seconds"]


def _as_job(http: httpx.Client, body: dict) -> tuple[float, float]:
    """The same for a job: submit, follow its events to the end, read the job."""
    t = time.perf_counter()
    r = http.post("/v1/t2i", json=body, headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    with connect_sse(http, "GET", r.headers["location"] + "/events") as source:
        for _ in source.iter_sse():
            pass
    job = http.get(r.headers["location"]).json()
    wall = time.perf_counter() - t
    assert job["status"] == "succeeded", job
    return wall, job["result"]["timings"]["seconds"]


def job_path_overhead(requests: int, workdir: Path) -> dict:
    args = ["--demo", "--engine", "reference", "--max-concurrent", "1", "--state-dir", str(workdir / "state")]
    sync = [0.0, 0.0]
    jobs = [0.0, 0.0]
    with running_server(args, workdir / "server.log") as server, httpx.Client(base_url=server.url, timeout=300) as http:
        _synchronous(http, {**BODY, "seed": 0})  # warm-up, both paths
        _as_job(http, {**BODY, "seed": 0})
        for i in range(requests):
            body = {**BODY, "seed": 100 + i}
            order = [(_synchronous, sync), (_as_job, jobs)]
            for path, total in order if i % 2 == 0 else order[::-1]:  # each goes first half the time
                wall, generation = path(http, body)
                total[0] += wall
                total[1] += generation
    around = (jobs[0] - jobs[1]) - (sync[0] - sync[1])  # wall less generation, job path less synchronous
    return {"requests": requests, "sync_s": round(sync[0], 3), "job_s": round(jobs[0], 3),
            "overhead": round(jobs[0] / sync[0] - 1, 4),
            "overhead_ms_per_request": round((jobs[0] - sync[0]) / requests * 1000, 1),
            # the generation's own time inside each path: what of the overhead is around the engine
            "sync_generation_s": round(sync[1], 3), "job_generation_s": round(jobs[1], 3),
            # the job path's own cost (submit, claim, events, result), without the engine's run-to-run noise
            "around_engine_ms_per_request": round(around / requests * 1000, 1),
            "around_engine": round(around / sync[0], 4)}


class InstantExecutor:
    """A stand-in engine that answers at once: what is left is the store's work."""

    def __init__(self, slots: int) -> None:
        self.slots, self.active = slots, 0

    def free_slots(self) -> int:
        return self.slots - self.active

    def total_slots(self) -> int:
        return self.slots

    async def run(self, job: JobRow, report: JobReporter) -> bytes:
        self.active += 1
        report.admitted.set()
        try:
            await report.event("done", "{}")
            return b"{}"
        finally:
            self.active -= 1

    def webhook_body(self, job: JobRow) -> bytes:
        return b"{}"


async def store_rate(url: str, jobs: int, workdir: Path) -> dict:
    stores = [await open_store(url, workdir / f"r{i}", workdir / "results") for i in range(2)]
    for start in range(0, jobs, 50):
        await asyncio.gather(*(stores[0].submit(NewJob("t2i", b"{}")) for _ in range(min(50, jobs - start))))
    workers = [JobWorker(s, InstantExecutor(8), WorkerConfig(owner=f"replica-{i}", poll=0.01, lease=30))
               for i, s in enumerate(stores)]
    t = time.perf_counter()
    for w in workers:
        await w.start()
    while (await stores[0].counts())["succeeded"] < jobs:
        await asyncio.sleep(0.2)
    seconds = time.perf_counter() - t
    for w in workers:
        await w.stop()
    for s in stores:
        await s.close()
    return {"jobs": jobs, "seconds": round(seconds, 3), "jobs_per_s": round(jobs / seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="emu35-bench-jobs-") as tmp:
        work = Path(tmp)
        overhead = job_path_overhead(a.requests, work)
        print(f"job path vs synchronous ({overhead['requests']} requests): sync {overhead['sync_s']} s, "
              f"jobs {overhead['job_s']} s, overhead {overhead['overhead'] * 100:+.1f} % (goal <= 5 %), "
              f"{overhead['overhead_ms_per_request']:+.1f} ms per request; the generations themselves took "
              f"{overhead['sync_generation_s']} s and {overhead['job_generation_s']} s, so the job path's own "
              f"cost is {overhead['around_engine_ms_per_request']:+.1f} ms per request "
              f"({overhead['around_engine'] * 100:+.1f} %)")
        with postgres_cluster() as cluster:
            rate = asyncio.run(store_rate(fresh_database(cluster, "bench" + uuid.uuid4().hex[:8]), a.jobs, work))
        print(f"PostgreSQL, two replicas, instant engine: {rate['jobs']} jobs claimed and completed in "
              f"{rate['seconds']} s = {rate['jobs_per_s']} jobs/s")
    if a.json:
        a.json.write_text(json.dumps({"overhead": overhead, "store": rate}, indent=2))


if __name__ == "__main__":
    main()
