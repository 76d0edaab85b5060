"""Run ``python -m service serve`` as a real process on a free port, for tests over real sockets."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        if "--state-dir" not in args:  # each test server its own job store, never the user's
            args = [*args, "--state-dir", str(log_path.parent / f"state-{self.port}")]
        cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                if r.status_code == 200:
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"server failed to start: {r.json()}\n{self.log_tail()}")
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> None:
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        finally:
            # vLLM's engine process lives in the same session: make sure nothing is left behind
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._log.close()


@contextlib.contextmanager
def running_server(args: list[str], log_path: Path, ready_timeout: float = 300) -> Iterator[ServerProcess]:
    """A started, ready server for the ``with`` block; stopped (and its process group killed) after."""
    proc = ServerProcess(args, log_path)
    try:
        proc.wait_ready(ready_timeout)
        yield proc
    finally:
        proc.stop()


# ---- reading /metrics ------------------------------------------------------------------------------

#: What "nothing running in the engine" means: our pairs and vLLM's own live count of sequences.
IDLE_METRICS = ("emu35_running_pairs", "emu35_waiting_pairs", "emu35_engine_unfinished_sequences")


def scrape(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """/metrics parsed with prometheus-client's parser: (sample name, sorted labels) → value."""
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m: dict, name: str, **labels) -> float:
    """One sample of a scrape; 0 when the series does not exist yet (counters start at first use)."""
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_engine_idle(http: httpx.Client, within: float) -> float:
    """Seconds until the engine reports nothing running or waiting (every :data:`IDLE_METRICS` present
    and 0); fails after ``within`` seconds."""
    started = time.monotonic()
    while True:
        m = scrape(http)
        missing = [name for name in IDLE_METRICS if (name, ()) not in m]
        assert not missing, f"metrics missing: {missing}"
        elapsed = time.monotonic() - started
        if not any(m[(name, ())] for name in IDLE_METRICS):
            return elapsed
        if elapsed > within:
            raise AssertionError(f"engine still busy after {within} s: { {n: m[(n, ())] for n in IDLE_METRICS} }")
        time.sleep(0.05)
