"""The job store's faults as a client and an operator see them, on a real server (the demo model): an
unreachable store at start keeps ``/ready`` at 503 and ends the start with one line after
``--job-store-wait``; a full volume answers new jobs 507 with the reason while synchronous requests are
still served, ends every job, logs one line per change, and takes jobs again once space is freed."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.serverproc import ServerProcess, free_port, running_server

pytestmark = pytest.mark.slow

ASYNC = {"Prefer": "respond-async"}
SMALL = {"prompt": "a lighthouse", "size": "128x128", "image_area": 128 * 128}


def test_an_unreachable_store_keeps_ready_at_503_then_the_start_ends_in_one_line(tmp_path):
    store = f"postgresql://nobody@127.0.0.1:{free_port()}/jobs"  # nothing listens there
    proc = ServerProcess(["--demo", "--engine", "reference", "--job-store", store, "--job-store-wait", "8"],
                         tmp_path / "server.log")
    try:
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.proc.poll() is None:
            try:
                r = httpx.get(proc.url + "/ready", timeout=2)
                seen = (r.status_code, r.json())
                if r.json().get("job_store") == "waiting":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert seen is not None and seen[0] == 503 and seen[1]["job_store"] == "waiting", seen
        assert httpx.post(proc.url + "/v1/t2i", headers=ASYNC, json=SMALL, timeout=10).status_code == 503
        assert proc.proc.wait(90) == 1
    finally:
        proc.stop()
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    said = [line for line in log.splitlines() if "job store" in line]
    assert len(said) == 2, said  # waiting for it; giving up (with the flag that sets how long)
    assert "waiting up to 8 s" in said[0] and "cannot start" in said[1] and "--job-store-wait" in said[1]


class Tmpfs:
    def __init__(self, root: Path, size: str) -> None:
        root.mkdir(parents=True)
        self.root = root
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)],
                                               capture_output=True).returncode != 0:
            pytest.skip("needs root and tmpfs mounts (a small volume to fill)")

    def fill(self) -> None:
        with open(self.root / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    def free(self) -> None:
        (self.root / "filler").unlink()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], capture_output=True)


def wait_job(http: httpx.Client, job_id: str, within: float = 120) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"{job_id} not finished: {job}")


def test_a_full_volume_answers_507_serves_the_rest_and_takes_jobs_again_once_freed(tmp_path):
    volume = Tmpfs(tmp_path / "vol", "6m")
    log = tmp_path / "server.log"
    try:
        args = ["--demo", "--engine", "reference", "--max-concurrent", "1", "--job-lease", "6", "--state-dir", str(volume.root)]
        with running_server(args, log) as proc, httpx.Client(base_url=proc.url, timeout=60) as http:
            before = http.post("/v1/t2i", headers=ASYNC, json=SMALL)
            assert before.status_code == 202
            assert wait_job(http, before.json()["id"])["status"] == "succeeded"
            volume.fill()
            # SQLite may still fit a small job in its write-ahead log's existing pages: the first few may be
            # accepted; from the first 507 on, every new job is refused
            answers = [http.post("/v1/t2i", headers=ASYNC, json={**SMALL, "seed": i}) for i in range(12)]
            codes = [r.status_code for r in answers]
            assert 507 in codes and set(codes) <= {202, 507}, [r.text for r in answers]
            refused = answers[codes.index(507):]
            assert all(r.status_code == 507 for r in refused), codes
            accepted = [r.json()["id"] for r in answers if r.status_code == 202]
            err = refused[-1].json()["error"]
            assert err["code"] == "store_full" and "full" in err["message"]
            assert http.get("/ready").json()["job_store"] == "full"
            assert http.post("/v1/t2i", json=SMALL).status_code == 200  # synchronous requests are still served
            volume.free()
            deadline = time.monotonic() + 30
            while http.get("/ready").json().get("job_store") != "ok" and time.monotonic() < deadline:
                time.sleep(0.3)
            after = http.post("/v1/t2i", headers=ASYNC, json=SMALL)
            assert after.status_code == 202, after.text
            for job_id in [*accepted, after.json()["id"]]:  # held while full, run once freed
                assert wait_job(http, job_id)["status"] == "succeeded"
            listed = http.get("/v1/jobs", params={"limit": 100}).json()["data"]
            assert {j["status"] for j in listed} == {"succeeded"} and len(listed) == 2 + len(accepted)  # none unended
    finally:
        volume.close()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    said = [line for line in text.splitlines() if "job store" in line]
    assert len(said) == 2, said  # full; back
