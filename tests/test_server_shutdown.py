"""Graceful shutdown over real sockets: on SIGTERM the service stops admitting (``/ready`` 503, new work
503), lets in-flight generations finish within the grace period, aborts the rest after it, and exits 0.

The reference engine keeps these servers quick to start; the drain logic does not depend on the engine.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from httpx_sse import connect_sse

from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow


def _start(tmp_path, grace: float) -> ServerProcess:
    proc = ServerProcess(["--demo", "--engine", "reference", "--shutdown-grace-seconds", str(grace)],
                         tmp_path / "server.log")
    proc.wait_ready(180)
    return proc


def test_sigterm_drains_in_flight_streams_then_exits_cleanly(tiny_dir, tmp_path):
    server = _start(tmp_path, grace=60)
    try:
        kinds = []
        with httpx.Client(base_url=server.url, timeout=120) as client:
            with connect_sse(client, "POST", "/v1/t2i", json={"prompt": "a cat", "size": "256x256",
                                                              "stream": True}) as src:
                events = src.iter_sse()
                for sse in events:
                    kinds.append(sse.event)
                    if sse.event == "image_progress":
                        break
                server.terminate()
                deadline = time.monotonic() + 10
                while httpx.get(server.url + "/ready").status_code != 503:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                assert httpx.get(server.url + "/ready").json()["status"] == "draining"
                refused = httpx.post(server.url + "/v1/t2i", json={"prompt": "late", "size": "128x128"})
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
                for sse in events:
                    kinds.append(sse.event)
        assert kinds[-1] == "done" and "image" in kinds
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_work_still_running_after_the_grace_period_is_aborted(tiny_dir, tmp_path):
    server = _start(tmp_path, grace=1)
    try:
        kinds = []
        with httpx.Client(base_url=server.url, timeout=120) as client:
            with connect_sse(client, "POST", "/v1/t2i", json={"prompt": "a long one", "size": "768x768",
                                                              "stream": True}) as src:
                events = src.iter_sse()
                for sse in events:
                    kinds.append(sse.event)
                    if sse.event == "image_progress":
                        break
                started = time.monotonic()
                server.terminate()
                with pytest.raises(httpx.TransportError):  # the stream is cut, not completed
                    for sse in events:
                        kinds.append(sse.event)
                        assert sse.event != "done"
        assert server.proc.wait(60) == 0
        assert time.monotonic() - started < 30
        assert "done" not in kinds
    finally:
        server.stop()
