"""The service on the native engine over real sockets (``emu35-serve --demo --engine native --decoding
jacobi``): every task answers under every schedule, streams rows as they complete with previews, OpenAI
partial images come under a schedule named in ``extra_body``, ``timings`` counts passes and tokens per
pass, ``/v1/models`` lists the schedules, and greedy ``jacobi`` (and ``zipar`` with a window of a whole
row) draws ``ar``'s image."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from httpx_sse import connect_sse
from PIL import Image

from tests.serverproc import running_server

pytestmark = pytest.mark.slow

SIZE = "128x128"  # an 8×8 grid
GREEDY = {"top_k": 1}


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with running_server(["--demo", "--engine", "native", "--decoding", "jacobi", "--max-concurrent", "4"],
                        tmp_path_factory.mktemp("log") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_models_list_the_native_schedules_and_the_server_default(http):
    (card,) = http.get("/v1/models").json()["data"]
    assert card["engine"] == "native" and card["schedules"] == ["ar", "jacobi", "zipar"]
    assert card["decoding"] == {"mode": "jacobi", "draft_len": 16}


def test_greedy_jacobi_and_a_whole_row_window_draw_ars_image_in_fewer_passes(http):
    body = {"prompt": "a red circle", "size": SIZE, "seed": 3, "image_sampling": GREEDY}
    answers = {}
    for name, decoding in (("ar", {"mode": "ar"}), ("jacobi", {"mode": "jacobi", "draft_len": 8}),
                           ("zipar-row", {"mode": "zipar", "window": 8})):
        r = http.post("/v1/t2i", json={**body, "decoding": decoding})
        assert r.status_code == 200, r.text
        answers[name] = r.json()
    ar = answers["ar"]
    assert ar["timings"]["tokens_per_pass"] == 1.0 and ar["timings"]["decode_steps"] == ar["usage"]["completion_tokens"]
    for name in ("jacobi", "zipar-row"):
        assert np.array_equal(pixels(answers[name]["images"][0]["b64_json"]), pixels(ar["images"][0]["b64_json"])), name
        assert answers[name]["usage"] == ar["usage"]
    assert answers["jacobi"]["timings"]["decode_steps"] < ar["timings"]["decode_steps"]
    assert answers["jacobi"]["timings"]["decoding"] == {"mode": "jacobi", "draft_len": 8}


@pytest.mark.parametrize("decoding", [{"mode": "ar"}, {"mode": "jacobi", "draft_len": 4}, {"mode": "zipar", "window": 2},
                                      {"mode": "zipar", "window": 2, "draft_len": 3}])
def test_t2i_streams_rows_as_they_complete_under_every_schedule(http, decoding):
    req = {"prompt": "a blue square", "size": SIZE, "seed": 11, "decoding": decoding}
    with connect_sse(http, "POST", "/v1/t2i", json={**req, "stream": True, "preview_every_rows": 3}) as src:
        events = [(e.event, json.loads(e.data)) for e in src.iter_sse()]
    names = [n for n, _ in events]
    assert names[0] == "image_start" and names[-2:] == ["image", "done"], names
    progress = [d for n, d in events if n == "image_progress"]
    rows = [p["rows"] for p in progress]  # rows come as they complete: several at once when a pass ends them
    assert rows == sorted(set(rows)) and rows[-1] == 8 and all(p["total_rows"] == 8 for p in progress)
    if decoding["mode"] == "ar":
        assert rows == list(range(1, 9))
    assert [p["rows"] for p in progress if "b64_json" in p] == [3, 6]
    done = events[-1][1]
    assert done["timings"]["decoding"]["mode"] == decoding["mode"]
    if decoding["mode"] != "ar":
        assert done["timings"]["tokens_per_pass"] > 1
    plain = http.post("/v1/t2i", json=req).json()  # the stream's image is the JSON answer's
    assert events[-2][1]["b64_json"] == plain["images"][0]["b64_json"]


def test_x2i_guidance_and_narrative_answer_under_the_schedules(http):
    r = http.post("/v1/x2i", json={"prompt": "make it red", "images": [png_b64()], "size": SIZE, "seed": 2,
                                   "decoding": {"mode": "zipar", "window": 4}})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1 and r.json()["timings"]["tokens_per_pass"] > 1
    for path, decoding in (("/v1/guidance", {"mode": "jacobi", "draft_len": 4}), ("/v1/narrative", {"mode": "zipar", "window": 4})):
        req = {"prompt": "a robot", "size": SIZE, "seed": 4, "max_new_tokens": 200, "decoding": decoding,
               "stream": True}
        with connect_sse(http, "POST", path, json=req) as src:
            assert src.response.status_code == 200, src.response.read()
            events = [(e.event, json.loads(e.data)) for e in src.iter_sse()]
        assert events and events[-1][0] == "done", (path, src.response.headers, events[-3:])
        timings = events[-1][1]["timings"]
        assert timings["decoding"]["mode"] == decoding["mode"] and timings["tokens_per_pass"] >= 1
        assert timings["decode_steps"] <= events[-1][1]["usage"]["completion_tokens"]


def test_openai_partial_images_under_a_schedule_in_extra_body(http):
    req = {"prompt": "a green circle", "size": SIZE, "stream": True, "partial_images": 2, "seed": 1,
           "decoding": {"mode": "zipar", "window": 2}}
    with connect_sse(http, "POST", "/v1/images/generations", json=req) as src:
        events = [(e.event, json.loads(e.data)) for e in src.iter_sse()]
    kinds = [n for n, _ in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    r = http.post("/v1/images/generations", json={**req, "stream": False, "decoding": {"mode": "ar", "window": 2}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "decoding.window"


def test_a_job_carries_its_schedule_and_a_bad_one_is_refused_before_it_is_stored(http):
    import time

    prefer = {"Prefer": "respond-async"}
    bad = http.post("/v1/t2i", headers=prefer, json={"prompt": "a", "decoding": {"mode": "ar", "window": 3}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "decoding.window"
    r = http.post("/v1/t2i", headers=prefer, json={"prompt": "a red circle", "size": SIZE, "seed": 5,
                                                   "decoding": {"mode": "zipar", "window": 2}})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while (job := http.get(r.headers["Location"]).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    assert job["result"]["timings"]["decoding"] == {"mode": "zipar", "draft_len": 1, "window": 2}
