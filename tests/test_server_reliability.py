"""A dead engine heals, and engine processes never outlive the server (over real processes).

Each test starts its own ``serve --demo`` (vLLM on the CPU) and kills something with SIGKILL, the way a
crash or an OOM kill would: the engine core while a stream and a JSON request run, or the server itself.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Callable

import httpx
import psutil
import pytest
from httpx_sse import connect_sse

from tests.serverproc import metric, running_server, scrape

pytestmark = pytest.mark.slow

pytest.importorskip("vllm", reason="the engine processes under test are vLLM's")


def _engine_processes(server_pid: int) -> list[psutil.Process]:
    """vLLM's processes under the server (engine core, workers); they retitle themselves ``VLLM::...``."""
    out = []
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            if "VLLM" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not true within {within} s"
        time.sleep(0.05)


def test_killing_the_engine_core_fails_in_flight_work_cleanly_and_the_process_exits_non_zero(tmp_path):
    with running_server(["--demo", "--max-concurrent", "2"], tmp_path / "server.log") as server:
        pgid = server.proc.pid
        try:
            http = httpx.Client(base_url=server.url, timeout=60)
            events: list[tuple[str, dict, float]] = []
            plain: dict = {}
            drawing = threading.Event()

            def stream() -> None:
                body = {"prompt": "a long river", "size": "256x256", "seed": 1, "stream": True}
                with connect_sse(http, "POST", "/v1/t2i", json=body) as source:
                    for sse in source.iter_sse():
                        events.append((sse.event, json.loads(sse.data) if sse.data else {}, time.monotonic()))
                        if sse.event == "image_progress":
                            drawing.set()

            def json_request() -> None:
                r = http.post("/v1/t2i", json={"prompt": "a tall tower", "size": "256x256", "seed": 2})
                plain.update(status=r.status_code, body=r.json(), at=time.monotonic())

            # the stream first; the JSON request once the stream draws; the kill once the engine reports both
            # decoding (each needs hundreds of steps, so neither can finish between the scrape and the kill)
            threads = [threading.Thread(target=stream), threading.Thread(target=json_request)]
            threads[0].start()
            assert drawing.wait(120), "the stream never started drawing"
            threads[1].start()
            _wait_for(lambda: metric(scrape(http), "emu35_running_pairs") == 2 and not plain, within=60)
            assert not plain and events[-1][0] == "image_progress", (plain, events[-3:])
            (core,) = [p for p in _engine_processes(server.proc.pid) if "EngineCore" in " ".join(p.cmdline())]
            killed_at = time.monotonic()
            core.kill()
            for t in threads:
                t.join(30)

            kind, data, at = events[-1]
            assert kind == "error" and data["code"] == "engine_unavailable", events[-3:]
            assert at - killed_at < 5
            assert plain["status"] == 503 and plain["body"]["error"]["code"] == "engine_unavailable", plain
            assert plain["at"] - killed_at < 5
            try:  # liveness fails (or the process has already gone)
                assert httpx.get(server.url + "/health", timeout=2).status_code == 503
            except httpx.TransportError:
                pass
            code = server.proc.wait(max(0.1, 10 - (time.monotonic() - killed_at)))
            assert code != 0
            assert time.monotonic() - killed_at < 10
        finally:
            _kill_group(pgid)


def test_no_engine_process_outlives_a_killed_server(tmp_path):
    with running_server(["--demo"], tmp_path / "server.log") as server:
        pgid = server.proc.pid
        try:
            engine = _engine_processes(server.proc.pid)
            assert any("EngineCore" in " ".join(p.cmdline()) for p in engine), [p.cmdline() for p in engine]
            server.proc.kill()  # the server alone, as an OOM kill or a crash would
            server.proc.wait(10)
            gone, alive = psutil.wait_procs(engine, timeout=10)
            assert not alive, f"still running 10 s after the server died: {[p.cmdline() for p in alive]}"
        finally:
            _kill_group(pgid)
