"""Durable jobs over real sockets: ``Prefer: respond-async`` on the generation routes, the ``/v1/jobs``
resource, resumable events, cancel, webhooks, and every bad input (the reference engine on the tiny model,
128×128 images: about a second each)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from standardwebhooks.webhooks import Webhook

from tests.serverproc import metric, running_server, scrape, wait_engine_idle

pytestmark = pytest.mark.slow

SECRET = "whsec_" + "dGVzdC13ZWJob29rLXNlY3JldC0xMjM0"
ASYNC = {"Prefer": "respond-async"}
SMALL = {"size": "128x128", "image_area": 128 * 128}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    args = ["--demo", "--engine", "reference", "--max-concurrent", "1", "--max-queue", "2", "--state-dir", str(state),
            "--webhook-allow-hosts", "127.0.0.1:*", "--webhook-allow-private", "--webhook-secret", SECRET, "--replica-id", "http-test"]
    with running_server(args, tmp_path_factory.mktemp("log") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def submit(http: httpx.Client, path: str = "/v1/t2i", headers: dict[str, str] | None = None, **body: Any) -> dict:
    r = http.post(path, json={"prompt": "a red fox", **SMALL, **body}, headers={**ASYNC, **(headers or {})})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and r.headers["preference-applied"] == "respond-async"
    assert job["status"] == "queued" and job["object"] == "job"
    return job


def wait_status(http: httpx.Client, job_id: str, statuses: set[str], within: float = 120) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not {statuses} after {within} s: {job}")


def test_a_job_answers_what_the_synchronous_route_answers(http):
    job = submit(http, seed=11)
    done = wait_status(http, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["route"] == "t2i" and done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    assert done["progress"] == {"images": 1, "rows": 8}
    sync = http.post("/v1/t2i", json={"prompt": "a red fox", **SMALL, "seed": 11}).json()
    assert done["result"]["images"] == sync["images"]  # seeded: the same image either way
    assert done["result"]["object"] == sync["object"] == "emu35.generation"


def test_openai_routes_take_respond_async_too(http):
    r = http.post("/v1/images/generations", headers=ASYNC,
                  json={"prompt": "a boat", "size": "128x128", "image_area": 128 * 128, "seed": 2})
    assert r.status_code == 202, r.text
    done = wait_status(http, r.json()["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["route"] == "images_generations"
    assert len(done["result"]["data"]) == 1 and done["result"]["data"][0]["b64_json"]


def read_events(http: httpx.Client, job_id: str, last_event_id: str | None = None, stop_after: int | None = None):
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    got = []
    with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
        for sse in source.iter_sse():
            got.append((int(sse.id), sse.event))
            if stop_after is not None and len(got) == stop_after:
                break
    return got


def test_events_resume_after_last_event_id_exactly_once(http):
    job = submit(http, seed=5)
    first = read_events(http, job["id"], stop_after=3)  # a client that disconnects after 3 events
    assert [seq for seq, _ in first] == [1, 2, 3]
    rest = read_events(http, job["id"], last_event_id="3")
    seqs = [seq for seq, _ in rest]
    assert seqs == list(range(4, 4 + len(seqs))) and rest[-1][1] == "done"
    assert [e for _, e in first + rest].count("image") == 1
    # a finished job replays its whole stream
    assert read_events(http, job["id"]) == first + rest


def test_cancel_a_queued_and_a_running_job_frees_the_engine(http):
    running = submit(http, size="512x512", image_area=512 * 512)
    queued = submit(http)
    wait_status(http, running["id"], {"running"})
    r = http.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    r = http.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert wait_engine_idle(http, within=10) < 10  # the engine pair was aborted, not run to its end
    # the one slot is free again: a synchronous request runs at once
    started = time.monotonic()
    assert http.post("/v1/t2i", json={"prompt": "x", **SMALL}).status_code == 200
    assert time.monotonic() - started < 30
    m = scrape(http)
    assert metric(m, "emu35_requests_in_flight") == 0
    assert http.get(f"/v1/jobs/{running['id']}").json()["status"] == "canceled"


def test_list_filters_by_status_and_paginates(http):
    ids = [submit(http)["id"] for _ in range(3)]
    for job_id in ids:
        wait_status(http, job_id, {"succeeded", "failed"})
    page = http.get("/v1/jobs", params={"limit": 2}).json()
    assert page["has_more"] and [j["id"] for j in page["data"]] == ids[::-1][:2]
    nxt = http.get("/v1/jobs", params={"limit": 2, "after": page["last_id"]}).json()
    assert nxt["data"][0]["id"] == ids[0]
    canceled = http.get("/v1/jobs", params={"status": "canceled"}).json()["data"]
    assert all(j["status"] == "canceled" for j in canceled)
    assert http.get("/v1/jobs", params={"status": "nonsense"}).status_code == 400


def test_delete_a_finished_job(http):
    job = submit(http)
    wait_status(http, job["id"], {"succeeded", "failed"})
    assert http.delete(f"/v1/jobs/{job['id']}").json() == {"id": job["id"], "object": "job", "deleted": True}
    assert http.get(f"/v1/jobs/{job['id']}").status_code == 404


class _Receiver(BaseHTTPRequestHandler):
    fail_first = 2
    got: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).got.append((dict(self.headers), body))
        self.send_response(500 if len(type(self).got) <= type(self).fail_first else 200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhook_is_signed_and_delivered_after_two_500s(http):
    receiver = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        job = submit(http, webhook=f"http://127.0.0.1:{receiver.server_port}/done")
        wait_status(http, job["id"], {"succeeded", "failed"})
        deadline = time.monotonic() + 30
        while len(_Receiver.got) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        receiver.shutdown()
    assert len(_Receiver.got) == 3
    for headers, body in _Receiver.got:
        payload = Webhook(SECRET).verify(body, headers)
        assert payload["id"] == job["id"] and payload["status"] == "succeeded"


@pytest.mark.parametrize("case", [
    "unknown job", "unknown job events", "cancel finished", "malformed last-event-id", "webhook host",
    "webhook scheme", "invalid body", "prefer other"])
def test_bad_input(http, case):
    finished = submit(http)["id"]
    wait_status(http, finished, {"succeeded", "failed"})
    before = http.get("/v1/jobs", params={"limit": 100}).json()["data"]
    if case == "unknown job":
        r = http.get("/v1/jobs/job-0123")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "job_not_found")
        assert http.post("/v1/jobs/job-0123/cancel").status_code == 404
        assert http.delete("/v1/jobs/job-0123").status_code == 404
    elif case == "unknown job events":
        assert http.get("/v1/jobs/job-0123/events").status_code == 404
    elif case == "cancel finished":
        r = http.post(f"/v1/jobs/{finished}/cancel")
        assert (r.status_code, r.json()["error"]["code"]) == (409, "job_finished")
    elif case == "malformed last-event-id":
        for bad in ("x", "-1", "1.5", "9" * 40):
            r = http.get(f"/v1/jobs/{finished}/events", headers={"Last-Event-ID": bad})
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_last_event_id"), bad
    elif case == "webhook host":
        for how in ({"headers": {**ASYNC, "Webhook": "http://10.0.0.1/x"}, "json": {"prompt": "x", **SMALL}},
                    {"headers": ASYNC, "json": {"prompt": "x", **SMALL, "webhook": "http://metadata.internal/"}}):
            r = http.post("/v1/t2i", **how)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "webhook_not_allowed")
    elif case == "webhook scheme":
        r = http.post("/v1/t2i", headers={**ASYNC, "Webhook": "file:///etc/passwd"}, json={"prompt": "x", **SMALL})
        assert r.status_code == 400
    elif case == "invalid body":  # every synchronous check runs before the 202
        for body in ({"prompt": ""}, {"prompt": "x", "size": "3x3"}, {"prompt": "x", "seed": -1}):
            assert http.post("/v1/t2i", headers=ASYNC, json=body).status_code == 400
        r = http.post("/v1/images/generations", headers=ASYNC, json={"prompt": "x", "model": "other"})
        assert r.status_code == 404
    elif case == "prefer other":  # RFC 7240: an unknown preference is ignored
        r = http.post("/v1/t2i", headers={"Prefer": "return=minimal"}, json={"prompt": "x", **SMALL})
        assert r.status_code == 200 and r.json()["object"] == "emu35.generation"
    after = http.get("/v1/jobs", params={"limit": 100}).json()["data"]
    assert [(j["id"], j["status"]) for j in after] == [(j["id"], j["status"]) for j in before]  # nothing changed


def test_job_metrics(http):
    text = http.get("/metrics").text
    assert 'emu35_jobs{status="succeeded"}' in text
    assert "emu35_jobs_oldest_queued_age_seconds" in text and "emu35_job_lease_expiries_total" in text
    assert json.loads(http.get("/v1/jobs", params={"limit": 1}).text)["object"] == "list"
