"""Graceful shutdown over real sockets: on SIGTERM the service stops admitting (``/ready`` 503, new work
503), lets in-flight generations finish within the grace period, aborts the rest after it, and exits 0.

The reference engine keeps these servers quick to start; the drain logic does not depend on the engine.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import httpx
import pytest
from httpx_sse import connect_sse

from tests.serverproc import ServerProcess, metric, running_server, scrape

pytestmark = pytest.mark.slow


def _server(tmp_path, grace: float, *extra: str):
    return running_server(["--demo", "--engine", "reference", "--shutdown-grace-seconds", str(grace), *extra],
                          tmp_path / "server.log", ready_timeout=180)


@contextlib.contextmanager
def _streaming_mid_image(server: ServerProcess, size: str, kinds: list[str]) -> Iterator:
    """A T2I stream read up to its first ``image_progress`` event; yields the rest of its events.
    Every event seen is appended to ``kinds``."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        with connect_sse(client, "POST", "/v1/t2i", json={"prompt": "a cat", "size": size, "stream": True}) as src:
            events = src.iter_sse()  # keep a reference: a collected iterator closes the response
            for sse in events:
                kinds.append(sse.event)
                if sse.event == "image_progress":
                    break
            yield events


def test_sigterm_drains_in_flight_streams_then_exits_cleanly(tiny_dir, tmp_path):
    with _server(tmp_path, grace=60) as server:
        kinds: list[str] = []
        with _streaming_mid_image(server, "256x256", kinds) as events:
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


def test_work_still_running_after_the_grace_period_is_aborted_with_a_proper_answer(tiny_dir, tmp_path):
    """Past the grace, a stream ends with an ``error`` event and a proper end of stream (no cut chunk),
    and a JSON request still running gets a 503."""
    import json
    import threading

    with _server(tmp_path, grace=1) as server:
        kinds: list[str] = []
        plain: dict = {}

        def json_request() -> None:
            r = httpx.post(server.url + "/v1/t2i", json={"prompt": "a dog", "size": "768x768"}, timeout=120)
            plain.update(status=r.status_code, body=r.json())

        with _streaming_mid_image(server, "768x768", kinds) as events:
            waiter = threading.Thread(target=json_request)
            waiter.start()
            time.sleep(0.5)
            started = time.monotonic()
            server.terminate()
            last = None
            for sse in events:  # no TransportError: the stream ends properly
                kinds.append(sse.event)
                last = sse
            waiter.join(60)
        assert kinds[-1] == "error" and "done" not in kinds
        assert json.loads(last.data)["code"] == "shutting_down"
        assert plain["status"] == 503 and plain["body"]["error"]["code"] == "shutting_down", plain
        assert server.proc.wait(60) == 0
        assert time.monotonic() - started < 30


def test_a_request_still_queued_when_the_drain_begins_is_refused_not_started(tiny_dir, tmp_path):
    """One slot, one queue place: the running generation finishes within the grace, the one that was
    waiting for its slot gets the 503 ``shutting_down`` a newcomer gets, instead of starting work the
    drain would cut."""
    import threading

    with _server(tmp_path, 60, "--max-concurrent", "1", "--max-queue", "1") as server:
        answers: dict[str, httpx.Response] = {}

        def post(name: str, size: str) -> None:
            answers[name] = httpx.post(server.url + "/v1/t2i", json={"prompt": name, "size": size}, timeout=120)

        running = threading.Thread(target=post, args=("running", "512x512"))
        running.start()
        with httpx.Client(base_url=server.url) as http:
            deadline = time.monotonic() + 30
            while metric(scrape(http), "emu35_requests_in_flight") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            queued = threading.Thread(target=post, args=("queued", "128x128"))
            queued.start()
            while metric(scrape(http), "emu35_queue_depth") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        server.terminate()
        running.join(120)
        queued.join(120)
        assert answers["running"].status_code == 200, answers["running"].text
        assert answers["queued"].status_code == 503
        assert answers["queued"].json()["error"]["code"] == "shutting_down"
        assert server.proc.wait(60) == 0
