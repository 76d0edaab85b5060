#!/usr/bin/env python3
"""Soak (not a test): load held, nothing lost (issue 32 item 10).

Runs ``serve --demo`` on a throwaway PostgreSQL job store for ``--minutes`` (20 by default) under a mix of
loopback clients, each a bounded loop:

- synchronous JSON requests;
- streamed requests, one in three of them dropped by its client after the first event;
- async jobs (``Prefer: respond-async``): some followed over ``/events`` (some of those dropped midway and
  resumed with ``Last-Event-ID``), some only polled, one in five canceled;

and, on a schedule, one engine kill (vLLM's engine core; with ``--engine reference`` the server itself,
whose engine dies with it) after which the server is started again as an orchestrator would (same
``--replica-id``: it queues its own jobs again), and one PostgreSQL restart (stopped for 5 s).

It reports requests served and 5xx answers outside the engine-kill window (goal 0), jobs submitted and
ended (goal: all, each exactly once: a succeeded job has one result and one ``done`` event in its
stream, each event id once), and the server's RSS two minutes after its (re)start and at the end (goal:
growth under 10 %). A 20-minute run is the lead's; ``--minutes 3`` checks the harness.

    .venv/bin/python bench/soak.py [--minutes 20] [--engine reference] [--json out.json] [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from httpx_sse import connect_sse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pgcluster import fresh_database, pg_cluster_control  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

BODY = {"prompt": "a lighthouse at dusk", "size": "128x128", "image_area": 128 * 128}
FINISHED = {"succeeded", "failed", "canceled"}


@dataclass
class Tally:
    """What the clients saw; shared by their threads under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    served: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    errors_5xx: list[tuple[float, int, str]] = field(default_factory=list)
    transport_errors: list[float] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    canceled: set[str] = field(default_factory=set)

    def answer(self, status: int, what: str) -> None:
        with self.lock:
            self.served += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1
            if status >= 500:
                self.errors_5xx.append((time.monotonic(), status, what))


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.tally = Tally()
        self.stop = threading.Event()
        self.server: ServerProcess | None = None
        self.url = ""
        self.kill_window: tuple[float, float] | None = None  # from the kill until the new server is ready
        self.restarts = 0
        self.rss: dict[str, float] = {}

    # ---- the server ---------------------------------------------------------------------------------
    def start_server(self, store: str) -> None:
        extra = ["--engine", self.args.engine] if self.args.engine else []
        self.server = ServerProcess(
            ["--demo", *extra, "--max-concurrent", "2", "--max-queue", "8", "--job-store", store,
             "--state-dir", str(self.work / "state"), "--replica-id", "soak", "--job-lease", "10"],
            self.work / f"server-{self.restarts}.log")
        self.server.wait_ready(600)
        self.url = self.server.url

    def kill_engine(self, store: str) -> None:
        """Kill the engine (vLLM's engine core, or the whole server when the engine lives in it), then
        start the server again under the same replica id, as an orchestrator would."""
        assert self.server is not None
        started = time.monotonic()
        cores = [p for p in psutil.Process(self.server.proc.pid).children(recursive=True)
                 if "EngineCore" in " ".join(_cmdline(p))]
        if cores:
            cores[0].kill()  # the server fails in-flight work and exits non-zero
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.server.proc.wait(60)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.proc.pid, signal.SIGKILL)
        self.server.stop(timeout=5)  # whatever is left of its process group
        self.restarts += 1
        self.start_server(store)
        self.kill_window = (started, time.monotonic() + 5)  # answers already in flight get 5 s more

    # ---- the clients ---------------------------------------------------------------------------------
    def client(self, kind: str, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                try:
                    getattr(self, f"_{kind}")(http, rng)
                except httpx.TransportError:
                    self.tally.transport_errors.append(time.monotonic())
                    time.sleep(1.0)  # the server is restarting
                self.stop.wait(rng.uniform(0.2, 1.0))

    def _sync(self, http: httpx.Client, rng: random.Random) -> None:
        r = http.post(self.url + "/v1/t2i", json={**BODY, "seed": rng.randrange(10**6)})
        self.tally.answer(r.status_code, "sync")

    def _stream(self, http: httpx.Client, rng: random.Random) -> None:
        drop = rng.random() < 1 / 3
        with connect_sse(http, "POST", self.url + "/v1/t2i",
                         json={**BODY, "seed": rng.randrange(10**6), "stream": True}) as source:
            self.tally.answer(source.response.status_code, "stream")
            if source.response.status_code != 200:
                return
            for _ in source.iter_sse():
                if drop:  # a client that goes away mid-stream
                    return

    def _jobs(self, http: httpx.Client, rng: random.Random) -> None:
        r = http.post(self.url + "/v1/t2i", headers={"Prefer": "respond-async"},
                      json={**BODY, "seed": rng.randrange(10**6)})
        self.tally.answer(r.status_code, "submit")
        if r.status_code != 202:
            return
        job_id = r.json()["id"]
        with self.tally.lock:
            self.tally.jobs.append(job_id)
        roll = rng.random()
        if roll < 0.2:
            c = http.post(f"{self.url}/v1/jobs/{job_id}/cancel")
            self.tally.answer(c.status_code, "cancel")
            if c.status_code == 200:
                with self.tally.lock:
                    self.tally.canceled.add(job_id)
        elif roll < 0.6:
            self._follow(http, job_id, drop_after=rng.choice([None, 2]))
        else:
            for _ in range(120):
                g = http.get(f"{self.url}/v1/jobs/{job_id}")
                self.tally.answer(g.status_code, "poll")
                if g.status_code != 200 or g.json()["status"] in FINISHED or self.stop.is_set():
                    return
                time.sleep(0.5)

    def _follow(self, http: httpx.Client, job_id: str, drop_after: int | None) -> None:
        last = None
        for _ in range(2):  # the first read may drop midway; the second resumes with Last-Event-ID
            headers = {"Last-Event-ID": last} if last else {}
            with connect_sse(http, "GET", f"{self.url}/v1/jobs/{job_id}/events", headers=headers) as source:
                self.tally.answer(source.response.status_code, "events")
                if source.response.status_code != 200:
                    return
                for n, sse in enumerate(source.iter_sse(), 1):
                    last = sse.id
                    if drop_after is not None and n == drop_after:
                        break
                else:
                    return
            drop_after = None

    # ---- the run ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        total = self.args.minutes * 60
        with pg_cluster_control() as cluster:
            store = fresh_database(cluster.url, "soak")
            self.start_server(store)
            began = time.monotonic()
            kinds = ["sync", "stream", "jobs", "jobs"]
            threads = [threading.Thread(target=self.client, args=(k, i), daemon=True) for i, k in enumerate(kinds)]
            for t in threads:
                t.start()
            kill_at, pg_at = began + total * 0.1, began + total * 0.5
            rss_first_at: float | None = None
            killed = pg_done = False
            while time.monotonic() - began < total:
                now = time.monotonic()
                if not killed and now >= kill_at:
                    self.kill_engine(store)
                    killed = True
                    rss_first_at = time.monotonic() + min(120.0, total * 0.2)
                if not pg_done and now >= pg_at:
                    cluster.stop()
                    time.sleep(5)
                    cluster.start()
                    pg_done = True
                if rss_first_at is not None and "after_restart_plus_2min" not in self.rss and now >= rss_first_at:
                    self.rss["after_restart_plus_2min"] = self._rss()
                time.sleep(0.5)
            self.rss["end"] = self._rss()
            self.stop.set()
            for t in threads:
                t.join(180)
            report = self._settle(began)
            assert self.server is not None
            self.server.stop()
        return report

    def _rss(self) -> float:
        assert self.server is not None
        return psutil.Process(self.server.proc.pid).memory_info().rss / 2**20

    def _settle(self, began: float) -> dict[str, Any]:
        """Wait (bounded) for every job to end, then check each ended exactly once."""
        ids = list(self.tally.jobs)
        deadline = time.monotonic() + 600
        with httpx.Client(base_url=self.url, timeout=60) as http:
            rows: dict[str, dict] = {}
            while time.monotonic() < deadline:
                for job_id in ids:
                    if rows.get(job_id, {}).get("status") not in FINISHED:
                        rows[job_id] = http.get(f"/v1/jobs/{job_id}").json()
                if all(r.get("status") in FINISHED for r in rows.values()):
                    break
                time.sleep(2)
            twice, unended = [], [i for i, r in rows.items() if r.get("status") not in FINISHED]
            for job_id, row in rows.items():
                with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
                    events = [(int(s.id), s.event) for s in source.iter_sse()] if source.response.status_code == 200 else []
                seqs = [s for s, _ in events]
                dones = sum(1 for _, e in events if e == "done")
                if seqs != sorted(set(seqs)) or dones > 1 or (row.get("status") == "succeeded" and dones != 1):
                    twice.append(job_id)
        results = list((self.work / "state" / "results").glob("*.json"))
        statuses: dict[str, int] = {}
        for r in rows.values():
            statuses[r.get("status", "?")] = statuses.get(r.get("status", "?"), 0) + 1
        window = self.kill_window
        outside = [e for e in self.tally.errors_5xx if window is None or not (window[0] <= e[0] <= window[1])]
        growth = (self.rss["end"] / self.rss["after_restart_plus_2min"] - 1) if "after_restart_plus_2min" in self.rss else None
        return {
            "minutes": self.args.minutes, "engine": self.args.engine or "default (--demo)",
            "requests_served": self.tally.served, "answers_by_status": dict(sorted(self.tally.by_status.items())),
            "5xx_total": len(self.tally.errors_5xx), "5xx_outside_engine_kill_window": len(outside),
            "5xx_outside_detail": outside[:10], "transport_errors": len(self.tally.transport_errors),
            "jobs_submitted": len(ids), "jobs_ended": len(ids) - len(unended), "jobs_unended": unended,
            "jobs_by_status": statuses, "jobs_not_exactly_once": twice,
            "result_files": len(results), "succeeded": statuses.get("succeeded", 0),
            "server_restarts": self.restarts, "rss_mib": self.rss,
            "rss_growth": None if growth is None else round(growth, 4),
            "seconds": round(time.monotonic() - began, 1),
        }


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="how long the load runs (default 20)")
    ap.add_argument("--engine", default=None, help="the engine to serve --demo with (default: --demo's own)")
    ap.add_argument("--json", type=Path, default=None, help="write the report here too")
    ap.add_argument("--logs", type=Path, default=None, help="copy the server logs (one per start) here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with tempfile.TemporaryDirectory(prefix="emu35-soak-") as tmp:
        try:
            report = Soak(args, Path(tmp)).run()
        finally:
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in Path(tmp).glob("server-*.log"):
                    shutil.copy(log, args.logs / log.name)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    ok = (report["5xx_outside_engine_kill_window"] == 0 and not report["jobs_unended"]
          and not report["jobs_not_exactly_once"] and report["result_files"] == report["succeeded"]
          and (report["rss_growth"] is None or report["rss_growth"] < 0.10))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
