"""Nothing is lost across a crash: SIGKILL of the whole server process group while 3 jobs run and 5 wait,
then a restart — all 8 succeed, each result stored once (SQLite and PostgreSQL). And two replicas on one
PostgreSQL share the queue; one killed mid-job has its job finished by the other after the lease."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.pgcluster import fresh_database
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow

JOB_BODY = {"prompt": "a lighthouse", "size": "256x256", "image_area": 256 * 256, "seed": 1}


def start(args: list[str], log: Path) -> ServerProcess:
    proc = ServerProcess(["--demo", "--engine", "reference", *args], log)
    proc.wait_ready(180)
    return proc


def kill_group(proc: ServerProcess) -> None:
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(10)
    proc._log.close()


def jobs_by_status(url: str) -> dict[str, list[dict]]:
    data = httpx.get(url + "/v1/jobs", params={"limit": 100}, timeout=30).json()["data"]
    out: dict[str, list[dict]] = {}
    for j in data:
        out.setdefault(j["status"], []).append(j)
    return out


def wait_until(predicate, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not {what} after {within} s")


def submit(url: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = httpx.post(url + "/v1/t2i", headers={"Prefer": "respond-async"}, json={**JOB_BODY, "seed": i}, timeout=60)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


def assert_all_succeeded_once(url: str, ids: list[str], results: Path) -> list[dict]:
    done = [httpx.get(f"{url}/v1/jobs/{i}", timeout=30).json() for i in ids]
    assert [j["status"] for j in done] == ["succeeded"] * len(ids), [(j["status"], j["error"]) for j in done]
    assert all(j["result"]["images"] for j in done)
    files = sorted(p.name for p in results.iterdir())
    assert files == sorted(f"{i}.json" for i in ids)  # exactly one result each, no stray temporaries
    return done


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_with_3_running_and_5_waiting_then_restart_loses_nothing(backend, request, tmp_path):
    state = tmp_path / "state"
    args = ["--max-concurrent", "3", "--max-queue", "5", "--state-dir", str(state), "--replica-id", "solo"]
    if backend == "postgresql":
        args += ["--job-store", fresh_database(request.getfixturevalue("pg_cluster"), "r" + uuid.uuid4().hex[:10])]
    first = start(args, tmp_path / "first.log")
    try:
        ids = submit(first.url, 8)
        wait_until(lambda: len(jobs_by_status(first.url).get("running", [])) == 3, 60, "3 running")
        now = jobs_by_status(first.url)
        cut = {j["id"] for j in now["running"]}
        assert len(cut) == 3 and len(now.get("queued", [])) == 5
    finally:
        kill_group(first)
    second = start(args, tmp_path / "second.log")
    try:
        wait_until(lambda: len(jobs_by_status(second.url).get("succeeded", [])) == 8, 240, "all 8 succeeded")
        done = assert_all_succeeded_once(second.url, ids, state / "results")
        attempts = {j["id"]: j["attempts"] for j in done}
        assert all(attempts[i] == 2 for i in cut), attempts  # the 3 cut by the kill ran again
        assert all(n <= 2 for n in attempts.values()), attempts
    finally:
        second.stop()


def test_two_replicas_share_one_postgresql_queue_and_take_over_a_dead_ones_job(pg_cluster, tmp_path):
    db = fresh_database(pg_cluster, "two" + uuid.uuid4().hex[:10])
    state = tmp_path / "state"  # a shared volume in a real deployment (results are files)
    common = ["--max-concurrent", "2", "--state-dir", str(state), "--job-store", db, "--job-lease", "2"]
    a = start([*common, "--replica-id", "a"], tmp_path / "a.log")
    b = start([*common, "--replica-id", "b"], tmp_path / "b.log")
    try:
        ids = submit(a.url, 10)
        seen: set[str] = set()

        def both_busy_then_a_running() -> bool:
            running = jobs_by_status(a.url).get("running", [])
            seen.update(j["replica"] for j in running)
            return seen == {"a", "b"} and any(j["replica"] == "a" for j in running)

        wait_until(both_busy_then_a_running, 60, "jobs running on both replicas")
        victim = next(j["id"] for j in jobs_by_status(a.url)["running"] if j["replica"] == "a")
        kill_group(a)
        wait_until(lambda: len(jobs_by_status(b.url).get("succeeded", [])) == 10, 300, "all 10 succeeded on b")
        done = assert_all_succeeded_once(b.url, ids, state / "results")
        assert {j["id"]: j["attempts"] for j in done}[victim] == 2
        metrics = httpx.get(b.url + "/metrics", timeout=30).text
        assert "emu35_job_lease_expiries_total" in metrics
    finally:
        if a.proc.poll() is None:
            kill_group(a)
        b.stop()
