"""The FlashAR demo over real sockets (``emu35-serve --demo --flashar``): T2I as JSON and as a stream with
per-diagonal previews, the OpenAI API with partial images, what a FlashAR checkpoint cannot do (400 before
any work), the model kind, and a bad checkpoint refused with exit code 2 naming the tensor."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from httpx_sse import connect_sse
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.serverproc import REPO, running_server

pytestmark = pytest.mark.slow

SIZE = "128x128"  # an 8×8 grid: 15 diagonals


@pytest.fixture(scope="module")
def flashar_dir(tiny_dir):
    from service.tiny.make import ensure_tiny_flashar

    return ensure_tiny_flashar(tiny_dir)


@pytest.fixture(scope="module")
def server(flashar_dir, tmp_path_factory):
    with running_server(["--demo", "--flashar", "--max-concurrent", "4"],
                        tmp_path_factory.mktemp("log") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_models_and_ready_say_flashar(http):
    assert http.get("/ready").json() == {"status": "ready", "model_kind": "flashar", "job_store": "ok"}
    assert [m["model_kind"] for m in http.get("/v1/models").json()["data"]] == ["flashar"]


def test_t2i_json_defaults_to_the_trained_32x32_grid_in_63_steps(http):
    r = http.post("/v1/t2i", json={"prompt": "a blue bird", "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "stop" and body["timings"]["decode_steps"] == 63
    (image,) = body["images"]
    assert (image["width"], image["height"]) == (512, 512)
    assert body["usage"]["visual_tokens"] == 1024


def test_t2i_stream_fills_in_by_diagonal_and_equals_the_json_answer(http):
    req = {"prompt": "a red house", "seed": 9, "size": SIZE}
    with connect_sse(http, "POST", "/v1/t2i", json={**req, "stream": True, "preview_every_rows": 7}) as src:
        events = [(e.event, json.loads(e.data)) for e in src.iter_sse()]
    names = [n for n, _ in events]
    assert names[0] == "image_start" and names[-2:] == ["image", "done"]
    progress = [d for n, d in events if n == "image_progress"]
    assert [p["diagonals"] for p in progress] == list(range(1, 15))  # every diagonal but the last
    assert all(p["total_diagonals"] == 15 for p in progress)
    previews = [p for p in progress if "b64_json" in p]
    assert [p["diagonals"] for p in previews] == [7, 14]  # every 7 diagonals, never the last
    preview = previews[0]
    pixels = _image(preview["b64_json"])
    # 7 diagonals drawn: cell (0, 0) is drawn, cell (7, 7) is not and stays grey
    assert (pixels[-16:, -16:] == 127).all() and not (pixels[:16, :16] == 127).all()
    done = events[-1][1]
    assert done["timings"]["decode_steps"] == 15
    plain = http.post("/v1/t2i", json=req).json()
    assert plain["images"][0]["b64_json"] == events[-2][1]["b64_json"]


def test_openai_generate_with_partial_images(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    stream = client.images.generate(model="emu3.5", prompt="a lighthouse", size="256x256", stream=True,
                                    partial_images=2, extra_body={"seed": 2})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    first = _image(events[0].b64_json)
    assert first.shape == (256, 256, 3) and (first[-16:, -16:] == 127).all()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/x2i", {"prompt": "make it night", "images": ["REF"]}, "images"),
    ("/v1/generate", {"task": "story", "prompt": "a story"}, "task"),
])
def test_what_flashar_cannot_do_is_a_400_that_says_why(http, path, body, param):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    ref = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {k: ([ref] if v == ["REF"] else v) for k, v in body.items()}
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert "FlashAR" in r.json()["error"]["message"] and r.json()["error"]["param"] == param


def test_a_bad_flashar_checkpoint_exits_2_naming_the_tensor(flashar_dir, tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(flashar_dir / "config.json", bad / "config.json")
    state = load_file(str(flashar_dir / "model.safetensors"))
    del state["hv_gate_mlp.2.bias"]
    save_file(state, str(bad / "model.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "service", "serve", "--model", str(bad), "--vq-model",
                           str(tiny_dir / "vq"), "--tokenizer", str(tiny_dir / "tokenizer"), "--port", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "hv_gate_mlp.2.bias" in proc.stderr
