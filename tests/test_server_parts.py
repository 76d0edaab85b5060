"""The service's parts without a server: settings, admission, image uploads, records, the VQ worker, the
reference engine behind the async API, and the task layer's event stream."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image

from service.server.core.errors import APIError
from service.server.core.image_io import image_bytes_from_text, open_image
from service.server.core.limiter import AdmissionLimiter, Overloaded
from service.server.core.records import RecordStore, valid_record_id
from service.settings import DEMO_IMAGE_AREA, Settings, load_settings


def png(w=32, h=24, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


# ---- settings ---------------------------------------------------------------------------------------


def test_flags_override_environment_and_env_overrides_defaults(monkeypatch):
    monkeypatch.setenv("EMU35_MAX_CONCURRENT", "3")
    monkeypatch.setenv("EMU35_DEMO", "true")
    s = load_settings([])
    assert s.max_concurrent == 3 and s.demo
    s = load_settings(["--max-concurrent", "5", "--api-key", "k", "--engine", "reference"])
    assert s.max_concurrent == 5 and s.api_key.get_secret_value() == "k" and s.engine_kind == "reference"


def test_settings_need_a_model_unless_demo(monkeypatch):
    for k in ("EMU35_DEMO", "EMU35_MODEL", "EMU35_VQ_MODEL"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="--model"):
        load_settings([])
    with pytest.raises(ValueError, match="max_concurrent"):
        load_settings(["--demo", "--max-concurrent", "0"])


def test_demo_defaults_fill_only_what_was_not_set(tmp_path):
    s = Settings(demo=True, image_area=128 * 128).with_demo_defaults(tmp_path)
    assert s.model == tmp_path / "model" and s.vq_model == tmp_path / "vq" and s.tokenizer_dir == tmp_path / "tokenizer"
    assert s.image_area == 128 * 128 and s.resolved_device == "cpu" and s.resolved_vq_device == "cpu"
    assert Settings(demo=True).with_demo_defaults(tmp_path).image_area == DEMO_IMAGE_AREA


def test_serve_reports_bad_flags_without_a_traceback(capsys):
    from service.server.run import serve_main

    assert serve_main(["--demo", "--port", "99999"]) == 2
    assert "port" in capsys.readouterr().err


# ---- admission ---------------------------------------------------------------------------------------


def test_limiter_admits_queues_in_order_then_refuses():
    async def scenario():
        lim = AdmissionLimiter(slots=2, queue=2)
        a, b = await lim.acquire(), await lim.acquire()
        order: list[str] = []

        async def wait(name):
            slot = await lim.acquire()
            order.append(name)
            return slot

        c = asyncio.create_task(wait("c"))
        d = asyncio.create_task(wait("d"))
        await asyncio.sleep(0)
        assert lim.waiting == 2 and lim.active == 2
        with pytest.raises(Overloaded) as exc:
            await lim.acquire()
        assert exc.value.retry_after >= 1
        a.release()
        a.release()  # idempotent
        sc = await c
        b.release()
        sd = await d
        assert order == ["c", "d"] and lim.active == 2 and lim.waiting == 0
        sc.release(), sd.release()
        assert lim.active == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_its_place_back():
    async def scenario():
        lim = AdmissionLimiter(slots=1, queue=1)
        held = await lim.acquire()
        waiter = asyncio.create_task(lim.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert lim.waiting == 0
        held.release()
        assert lim.active == 0
        (await lim.acquire()).release()

    asyncio.run(scenario())


# ---- image uploads -----------------------------------------------------------------------------------


def test_data_urls_and_plain_base64_decode_to_the_same_image():
    raw = png()
    plain = image_bytes_from_text(base64.b64encode(raw).decode(), 10**6, "images[0]")
    url = image_bytes_from_text("data:image/png;base64," + base64.b64encode(raw).decode(), 10**6, "images[0]")
    assert plain == url == raw
    im = open_image(raw, 10**6, 10**6, "images[0]")
    assert im.mode == "RGB" and im.size == (32, 24)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "GIF"])
def test_common_formats_are_read(fmt):
    assert open_image(png(fmt=fmt), 10**6, 10**6, "x").size == (32, 24)


@pytest.mark.parametrize("text,status,code", [
    ("###", 400, "invalid_base64"),
    ("https://example.com/photo.png", 400, "image_url_not_supported"),
    ("data:application/pdf;base64,AAAA", 400, "unsupported_image_type"),
    ("data:image/png,notbase64", 400, "invalid_image"),
    ("", 400, "invalid_image"),
    ("A" * 2000, 413, "image_too_large"),
])
def test_bad_image_text_is_a_client_error(text, status, code):
    with pytest.raises(APIError) as exc:
        image_bytes_from_text(text, 1000, "images[0]")
    assert (exc.value.status, exc.value.code, exc.value.param) == (status, code, "images[0]")


def test_an_image_url_is_refused_saying_urls_are_not_fetched():
    with pytest.raises(APIError) as exc:
        image_bytes_from_text("http://example.com/a.png", 10**6, "image")
    assert "not fetched" in exc.value.message and "base64" in exc.value.message


def test_ignored_openai_fields_are_named_in_a_safe_warning_header():
    from service.server.openai.serving import WARNING_MAX_CHARS, OpenAIJob

    job = OpenAIJob(None, None, ("sise", 'a"b\nc', "ü"))  # type: ignore[arg-type]
    assert job.headers == {"Warning": '299 - "ignored unknown fields: sise, a?b?c, ?"'}
    assert OpenAIJob(None, None).headers == {}  # type: ignore[arg-type]
    long = OpenAIJob(None, None, ("x" * 1000,)).headers["Warning"]  # type: ignore[arg-type]
    assert len(long) < WARNING_MAX_CHARS + 60


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(APIError) as exc:
        open_image(png(400, 300), 10**6, 400 * 300 - 1, "image")
    assert exc.value.code == "image_too_many_pixels"


def test_unsupported_and_corrupt_images_are_refused():
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    with pytest.raises(APIError, match="unsupported image format"):
        open_image(tiff.getvalue(), 10**6, 10**6, "image")
    with pytest.raises(APIError, match="not a readable image"):
        open_image(png()[:50], 10**6, 10**6, "image")


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_anything_but_an_api_error(data):
    try:
        open_image(data, 10**6, 10**6, "image")
    except APIError as exc:
        assert 400 <= exc.status < 500


# ---- records -----------------------------------------------------------------------------------------


def test_record_store_writes_atomically_and_refuses_odd_ids(tmp_path):
    store = RecordStore(tmp_path / "r")
    path = store.save("gen-1", b"abc")
    assert path.read_bytes() == b"abc" and store.load("gen-1") == b"abc" and store.load("gen-2") is None
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["gen-1.pb"]  # no temporary left behind
    for bad in ("../x", "a/b", "..", "", "a..b", ".hidden"):
        assert not valid_record_id(bad)
        with pytest.raises(ValueError):
            store.path(bad)


# ---- VQ worker ---------------------------------------------------------------------------------------


class _CountingCodec:
    """Stands in for the tokenizer: records each call's batch so merging can be checked."""

    downsample = 16

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.gate = threading.Event()

    def encode(self, images, area):
        self.gate.wait(5)
        self.calls.append(("encode", len(images)))
        return [np.full((1, 1), im.width, dtype=np.int64) for im in images]

    def decode(self, grids):
        self.gate.wait(5)
        self.calls.append(("decode", len(grids)))
        return [Image.new("RGB", (g.shape[1] * 16, g.shape[0] * 16)) for g in grids]


def test_vq_worker_merges_waiting_jobs_and_keeps_order():
    from service.vq.worker import VqWorker

    codec = _CountingCodec()
    seen: list[tuple[str, int]] = []
    worker = VqWorker(lambda: codec, observer=lambda kind, seconds, n: seen.append((kind, n)))
    worker.start(10)

    async def scenario():
        first = asyncio.create_task(worker.decode([np.zeros((2, 3), dtype=np.int64)]))
        await asyncio.sleep(0.05)  # the worker took the first job and waits on the gate
        jobs = [worker.decode([np.zeros((1, i + 1), dtype=np.int64)]) for i in range(3)]
        jobs.append(worker.encode([Image.new("RGB", (w, 8)) for w in (16, 32)], area=None))
        tasks = [asyncio.create_task(j) for j in jobs]
        await asyncio.sleep(0.05)
        codec.gate.set()
        out = await asyncio.gather(first, *tasks)
        return out

    try:
        out = asyncio.run(scenario())
    finally:
        worker.stop()
    assert out[0][0].size == (48, 32)
    assert [im[0].size for im in out[1:4]] == [(16, 16), (32, 16), (48, 16)]
    assert [int(g[0, 0]) for g in out[4]] == [16, 32]
    assert codec.calls == [("decode", 1), ("decode", 3), ("encode", 2)]  # three waiting decodes in one call
    assert seen == codec.calls


def test_vq_worker_reports_a_failed_load():
    from service.vq.worker import VqWorker

    def broken():
        raise FileNotFoundError("no such checkpoint")

    with pytest.raises(FileNotFoundError):
        VqWorker(broken).start(10)


# ---- the task layer over the reference engine ----------------------------------------------------------


@pytest.fixture(scope="module")
def runner(tiny_dir, tiny_tokenizer):
    from service.engine.reference import AsyncReferenceEngine
    from service.task import GenerationRunner
    from service.vq import VisionTokenizer
    from service.vq.worker import VqWorker

    engine = AsyncReferenceEngine(tiny_dir / "model", tiny_tokenizer, max_model_len=2048)
    engine.start()
    vq = VqWorker(lambda: VisionTokenizer.from_pretrained(tiny_dir / "vq"))
    vq.start(60)
    yield GenerationRunner(engine, vq, tiny_tokenizer, image_area=128 * 128)
    vq.stop()
    engine.shutdown()


def _collect(runner, gen, rid, preview=None, stop_after=None):
    from service.task import Finished, PreviewSchedule

    async def go():
        prepared = await runner.prepare(gen, rid)
        events = []
        stream = runner.run(prepared, PreviewSchedule.every(preview) if isinstance(preview, int) else preview)
        async for ev in stream:
            events.append(ev)
            if stop_after is not None and stop_after(ev):
                await stream.aclose()
                break
        return prepared, events

    prepared, events = asyncio.run(go())
    finished = [e for e in events if isinstance(e, Finished)]
    return prepared, events, (finished[0].outcome if finished else None)


def test_runner_streams_a_t2i_image_and_builds_its_record(runner):
    from service.prompts import Task
    from service.record import story_pb2
    from service.task import GenerationInput, GenerationOptions, ImageProgress, ImageReady, ImageStart
    from service.types import SamplingSettings

    greedy = SamplingSettings(1, 1.0, 1.0)
    gen = GenerationInput(Task.T2I, "a cat", (), GenerationOptions(size="128x128", text=greedy, image=greedy))
    prepared, events, out = _collect(runner, gen, "unit-t2i", preview=4)
    assert prepared.request.target_grid == (8, 8)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "ImageStart" and kinds[-2:] == ["ImageReady", "Finished"]
    begin = events[0]
    assert isinstance(begin, ImageStart) and (begin.width, begin.height) == (128, 128)
    progress = [e for e in events if isinstance(e, ImageProgress)]
    assert [p.rows for p in progress] == list(range(1, 9))
    assert [p.preview.size for p in progress if p.preview is not None] == [(128, 64)]  # at row 4 (not at 8: done)
    (image,) = [e.image for e in events if isinstance(e, ImageReady)]
    assert image.size == (128, 128) and out.images == [image]
    assert out.finish_reason == "stop" and out.usage.visual_tokens == 64 and out.usage.completion_tokens == 77
    assert out.decode_steps == 77  # autoregressive: one forward per token, the prefill choosing the first
    story = story_pb2.Story()
    story.ParseFromString(out.record)
    assert story.question == "a cat" and story.story_id == "unit-t2i"


def test_runner_interleaved_text_comes_before_the_image(runner):
    from service.prompts import Task
    from service.task import GenerationInput, GenerationOptions, ImageStart, TextOut

    gen = GenerationInput(Task.STORY, "a robot in the city", (), GenerationOptions(seed=3))
    _, events, out = _collect(runner, gen, "unit-story")
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextOut))
    first_image = next(i for i, e in enumerate(events) if isinstance(e, ImageStart))
    assert first_text < first_image
    assert {s.type for s in out.parts} >= {"global_cot", "text", "image"}
    streamed = "".join(e.delta for e in events if isinstance(e, TextOut) and e.channel == "text")
    assert out.text.strip() and out.text.strip() in streamed


def test_runner_refuses_what_cannot_run(runner):
    from service.prompts import Task
    from service.task import GenerationInput, GenerationOptions, PlanError

    async def prep(gen):
        return await runner.prepare(gen, "bad")

    for gen, match in [
        (GenerationInput(Task.T2I, "x", (), GenerationOptions(size="128x128", max_new_tokens=20)), "cannot hold"),
        (GenerationInput(Task.STORY, "x", (), GenerationOptions(max_new_tokens=5000)), "context"),
        (GenerationInput(Task.STORY, "x " * 3000, (), GenerationOptions()), "context"),
        (GenerationInput(Task.HOWTO, "x", (), GenerationOptions(size="match_reference")), "reference image"),
    ]:
        with pytest.raises(PlanError, match=match):
            asyncio.run(prep(gen))


def test_reference_images_that_cannot_fit_the_context_are_refused_before_encoding(runner, monkeypatch):
    """A 16×16 upload with image_area at its maximum (4096² px) would be resized to 16 megapixels and
    encoded (tens of GB on the CPU: the fuzzer's OOM kill) only to fail the context check afterwards."""
    from service.limits import MAX_IMAGE_AREA
    from service.prompts import Task
    from service.task import GenerationInput, GenerationOptions, PlanError

    async def never(*args, **kwargs):
        raise AssertionError("the reference image was encoded")

    monkeypatch.setattr(runner.vq, "encode", never)
    small = Image.new("RGB", (16, 16), (1, 2, 3))
    for task in (Task.X2I, Task.STORY):
        gen = GenerationInput(task, "x", (small,), GenerationOptions(image_area=MAX_IMAGE_AREA))
        with pytest.raises(PlanError, match="context") as err:
            asyncio.run(runner.prepare(gen, "too-big"))
        assert err.value.param == "image_area"


def test_closing_the_stream_aborts_the_reference_engine(runner):
    from service.prompts import Task
    from service.task import GenerationInput, GenerationOptions, ImageProgress

    gen = GenerationInput(Task.T2I, "x", (), GenerationOptions(size="256x256"))
    _, events, out = _collect(runner, gen, "unit-abort", stop_after=lambda e: isinstance(e, ImageProgress))
    assert out is None
    for _ in range(100):
        if runner.engine.stats().unfinished_sequences == 0:
            break
        import time

        time.sleep(0.02)
    assert runner.engine.stats().unfinished_sequences == 0


def test_each_generated_image_is_png_encoded_once_per_request(runner, monkeypatch):
    """The record, the SSE ``image`` event and the JSON answer all send the task layer's one PNG."""
    from PIL import Image as PILImage

    from service.prompts import Task
    from service.server.emu35.render import done_event, generation_body, sse_message
    from service.task import Finished, GenerationInput, GenerationOptions, SamplingSettings

    greedy = SamplingSettings(1, 1.0, 1.0)
    gen = GenerationInput(Task.T2I, "a cat", (), GenerationOptions(size="128x128", text=greedy, image=greedy))
    saves: list[str] = []
    real_save = PILImage.Image.save

    def counting_save(self, fp, format=None, **kw):
        saves.append(str(format).upper())
        return real_save(self, fp, format=format, **kw)

    monkeypatch.setattr(PILImage.Image, "save", counting_save)
    _, events, out = _collect(runner, gen, "unit-encode-once")
    for ev in events:  # what the SSE answer sends
        if not isinstance(ev, Finished):
            sse_message(ev)
    message = done_event(out, "/v1/records/unit-encode-once", include_record=False)
    assert message["event"] == "done"
    done = json.loads(message["data"])
    body = generation_body(out, "emu3.5", 0)  # what the JSON answer sends
    assert saves == ["PNG"]  # one image, one encoding
    assert body["images"][0]["b64_json"] == base64.b64encode(out.pngs[0]).decode()
    story = _story_of(out.record)
    assert story.clips[0].segments[0].images[0].image.image_data == out.pngs[0]
    assert "record" not in done and done["record_url"].endswith("unit-encode-once")
    # the done event names the record instead of repeating it: far smaller than the image it describes
    assert len(json.dumps(done)) < len(body["images"][0]["b64_json"])


def _story_of(record: bytes):
    from service.record import story_pb2

    story = story_pb2.Story()
    story.ParseFromString(record)
    return story


# ---- OpenAI image API parts ----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,total,rows", [
    (("every", 4), 8, (4,)),
    (("every", 3), 10, (3, 6, 9)),
    (("spread", 2), 8, (3, 5)),
    (("spread", 1), 8, (4,)),
    (("spread", 3), 8, (2, 4, 6)),
    (("spread", 3), 2, (1,)),  # too few rows for three: fewer partials, never the last row
    (("spread", 0), 8, ()),
])
def test_preview_schedule_names_the_preview_rows(schedule, total, rows):
    from service.task import PreviewSchedule

    kind, value = schedule
    plan = PreviewSchedule.every(value) if kind == "every" else PreviewSchedule.spread(value)
    assert plan.rows(total) == rows


def test_openai_size_rule():
    from service.prompts import Task
    from service.server.core.errors import APIError
    from service.server.openai.mapping import quality_preset, size_spec

    assert size_spec(None, Task.T2I) is None and size_spec("auto", Task.T2I) is None
    assert size_spec("auto", Task.X2I) == "match_reference"
    assert size_spec("1536x1024", Task.T2I) == "1536x1024"  # the planner fits it to the area
    for bad in ("1024x256", "256x1024", "big", "0x512"):
        with pytest.raises(APIError) as err:
            size_spec(bad, Task.T2I)
        assert err.value.status == 400 and err.value.param == "size"
    assert quality_preset(None) == ("high", 1.0) and quality_preset("low") == ("low", 0.25)
    assert quality_preset("standard") == ("medium", 9 / 16)


def test_openai_sizes_are_fitted_to_the_area_by_the_planner(tiny_tokenizer):
    from service.prompts import Task
    from service.task import GenerationOptions, PlanError, plan_request

    def grid(size, **kw):
        options = GenerationOptions(size=size, fit_size_to_area=True, **kw)
        return plan_request(tiny_tokenizer, Task.T2I, "x", [], options, "r").target_grid

    assert grid("1536x1024") == (52, 78)  # the task's 1024² area: the release's 3:2 grid
    assert grid("1536x1024", image_area=65536) == (13, 19)
    assert grid("128x128", image_area=65536) == (8, 8)
    assert grid(None, area_scale=0.25) == (27, 36)  # quality low: 4:3 at 512²
    req = plan_request(tiny_tokenizer, Task.T2I, "x", [], GenerationOptions(size="1024x1536"), "r")
    assert req.max_new_tokens >= 96 * 65 + 7  # the default budget grew to hold the forced image
    with pytest.raises(PlanError) as err:
        grid("1000x1000")
    assert err.value.param == "size" and "multiple of 16" in str(err.value)


def test_merged_streams_interleave_and_close_every_source():
    from service.server.core.streams import merge_streams

    closed: list[int] = []

    async def source(i: int, n: int, fail: bool = False):
        try:
            for k in range(n):
                await asyncio.sleep(0.001 * (i + 1))
                yield f"{i}:{k}"
            if fail:
                raise RuntimeError(f"source {i} broke")
        finally:
            closed.append(i)

    async def collect(streams):
        return [item async for item in merge_streams(streams)]

    items = asyncio.run(collect([source(0, 3), source(1, 2), source(2, 1)]))
    assert sorted(items) == sorted([(0, "0:0"), (0, "0:1"), (0, "0:2"), (1, "1:0"), (1, "1:1"), (2, "2:0")])
    assert sorted(closed) == [0, 1, 2]
    closed.clear()
    with pytest.raises(RuntimeError, match="source 1 broke"):
        asyncio.run(collect([source(0, 1000), source(1, 1, fail=True)]))
    assert sorted(closed) == [0, 1]  # the endless one was closed too


def test_runner_spreads_partial_previews_over_the_rows(runner):
    from service.prompts import Task
    from service.task import GenerationInput, GenerationOptions, ImageProgress, PreviewSchedule

    gen = GenerationInput(Task.T2I, "a cat", (), GenerationOptions(size="128x128", seed=1))
    _, events, out = _collect(runner, gen, "unit-spread", preview=PreviewSchedule.spread(2))
    previews = [(p.rows, p.preview.size) for p in events if isinstance(p, ImageProgress) and p.preview is not None]
    assert previews == [(3, (128, 48)), (5, (128, 80))]
    assert [p.rows for p in events if isinstance(p, ImageProgress)] == list(range(1, 9))
    assert out.finish_reason == "stop"


def test_openai_stream_renderer_sends_partials_on_a_blank_canvas_and_completed_with_usage():
    import base64
    import io
    import json

    import numpy as np
    from PIL import Image

    from service.prompts import Task
    from service.server.openai.mapping import OpenAIOutput
    from service.server.openai.render import OpenAIStreamRenderer, openai_error_event
    from service.task import Finished, ImageProgress, ImageStart, Outcome, Usage

    final = Image.new("RGB", (128, 128), (10, 200, 30))
    out = Outcome("img-1", Task.X2I, [final], [b"png"], [], "", b"", Usage(40, 77, 64, 13, 16), "stop", 0.1, 1.0)
    renderer = OpenAIStreamRenderer(OpenAIOutput("webp", 60, "medium", "image_edit", 1))
    assert renderer.message(2, ImageStart(0, 128, 128), 7) is None
    assert renderer.message(2, ImageProgress(0, 2, 8), 7) is None  # progress without a preview: nothing
    partial = renderer.message(2, ImageProgress(0, 4, 8, Image.new("RGB", (128, 64), (250, 0, 0))), 7)
    assert partial is not None and partial["event"] == "image_edit.partial_image"
    data = json.loads(partial["data"])
    assert {k: data[k] for k in ("type", "partial_image_index", "image_index", "size", "output_format", "quality",
                                 "background", "created_at")} == {
        "type": "image_edit.partial_image", "partial_image_index": 0, "image_index": 2, "size": "128x128",
        "output_format": "webp", "quality": "medium", "background": "opaque", "created_at": 7}
    im = Image.open(io.BytesIO(base64.b64decode(data["b64_json"])))
    assert im.format == "WEBP" and im.size == (128, 128)
    pixels = np.asarray(im.convert("RGB")).astype(int)
    assert abs(pixels[100, 64] - 127).max() <= 8 and pixels[10, 64, 0] > 200  # drawn rows red, the rest blank
    done = json.loads(renderer.message(2, Finished(out), 8)["data"])
    assert done["type"] == "image_edit.completed" and "partial_image_index" not in done
    assert done["usage"] == {"input_tokens": 40, "output_tokens": 77, "total_tokens": 117,
                             "input_tokens_details": {"text_tokens": 24, "image_tokens": 16},
                             "output_tokens_details": {"text_tokens": 13, "image_tokens": 64}}
    error = json.loads(openai_error_event("engine broke", "generation_failed")["data"])
    assert error["error"]["message"] == "engine broke"  # the shape the official client raises as APIError
def test_a_full_service_answers_429_before_decoding_any_upload():
    """At capacity, a request with images is refused before its uploads are touched (a 40-megapixel PNG
    costs a second of CPU and half a gigabyte to decode)."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from service.server.emu35.serving import ServingGeneration

    limiter = AdmissionLimiter(slots=1, queue=0)

    class NeverDecodes(ServingGeneration):
        async def job(self, *args, **kwargs):
            raise AssertionError("the uploads were looked at before admission")

    async def go():
        await limiter.acquire()  # the only slot is taken, the queue holds nothing
        serving = NeverDecodes(SimpleNamespace(state="ready", limiter=limiter))
        with pytest.raises(APIError) as err:
            await serving.create("x2i", None, None, [b"big png"], Request({"type": "http", "headers": []}))
        return err.value

    err = asyncio.run(go())
    assert err.status == 429 and err.code == "overloaded" and "Retry-After" in err.headers
    with pytest.raises(Overloaded):
        limiter.check_room()


def test_vq_worker_runs_final_images_before_previews():
    """Previews waiting in the same round as a final decode or an encode yield to them."""
    from service.vq.worker import VqWorker

    codec = _CountingCodec()
    worker = VqWorker(lambda: codec)
    worker.start(10)

    async def scenario():
        first = asyncio.create_task(worker.decode([np.zeros((1, 1), dtype=np.int64)], preview=True))
        await asyncio.sleep(0.05)  # the worker holds the first preview at the gate
        previews = [asyncio.create_task(worker.decode([np.zeros((2, 2), dtype=np.int64)], preview=True))
                    for _ in range(3)]
        await asyncio.sleep(0.01)
        final = asyncio.create_task(worker.decode([np.zeros((4, 4), dtype=np.int64)]))
        await asyncio.sleep(0.05)
        codec.gate.set()
        await asyncio.gather(first, final, *previews)

    try:
        asyncio.run(scenario())
    finally:
        worker.stop()
    # the held preview, then the final decode that arrived after three previews, then the previews merged
    assert codec.calls == [("decode", 1), ("decode", 1), ("decode", 3)]


def test_previews_are_capped_per_image_whatever_the_interval(runner):
    from service.limits import MAX_PREVIEWS_PER_IMAGE
    from service.prompts import Task
    from service.task import GenerationInput, GenerationOptions, ImageProgress, PreviewSchedule, SamplingSettings

    step = 64 // MAX_PREVIEWS_PER_IMAGE
    assert PreviewSchedule.every(1).rows(64) == tuple(range(step, 64, step))  # capped: not 63 previews
    assert PreviewSchedule.every(20).rows(64) == (20, 40, 60)  # a sparser request is kept
    greedy = SamplingSettings(1, 1.0, 1.0)
    gen = GenerationInput(Task.T2I, "a cat", (), GenerationOptions(size="256x256", text=greedy, image=greedy))
    _, events, _ = _collect(runner, gen, "unit-preview-floor", preview=1)
    previews = [e for e in events if isinstance(e, ImageProgress) and e.preview is not None]
    assert [p.rows for p in previews] == [2, 4, 6, 8, 10, 12, 14]  # 16 rows: every 2nd, not every row


# ---- /ready without the key -------------------------------------------------------------------------


@pytest.mark.parametrize("api_key,headers,shows_error", [
    ("k", {}, False),
    ("k", {"Authorization": "Bearer wrong"}, False),
    ("k", {"Authorization": "Bearer k"}, True),
    (None, {}, True),  # no key set: everything is open, the reason included
])
def test_ready_tells_why_it_failed_only_to_the_key_holder(api_key, headers, shows_error):
    """A failed start's reason may name files and paths: with an API key set, an anonymous caller (a
    probe, anyone on the network) gets the state only."""
    import httpx

    from service.server.app import create_app
    from service.server.core.runtime import Runtime

    settings = Settings(demo=True, api_key=api_key)
    runtime = Runtime(settings)
    runtime.state, runtime.error = "failed", "FileNotFoundError: /srv/secret/models/vq/model.ckpt"
    app = create_app(settings, runtime)  # no lifespan: the runtime stays as set

    async def get(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get(path, headers=headers)

    ready = asyncio.run(get("/ready"))
    assert ready.status_code == 503
    # the kind is no secret (it comes from the config); no lifespan ran, so the job store was never opened
    expected = {"status": "failed", "model_kind": "emu3.5", "job_store": "waiting"}
    if shows_error:
        expected["error"] = runtime.error
    assert ready.json() == expected
    health = asyncio.run(get("/health"))
    assert health.status_code == 503 and health.json() == {"status": "failed"}


def test_model_variant_flag_takes_and_lists_the_readme_values():
    """``--help`` lists ``{emu3.5,emu3.5-image}`` (as README and EMU35_MODEL_VARIANT spell them), not the
    enum's member names, and the value reaches the task layer as its enum."""
    import subprocess
    import sys

    from service.prompts import ModelVariant
    from service.settings import load_settings

    assert load_settings(["--demo", "--model-variant", "emu3.5-image"]).variant is ModelVariant.EMU35_IMAGE
    with pytest.raises(ValueError):
        load_settings(["--demo", "--model-variant", "EMU35_IMAGE"])
    help_text = subprocess.run([sys.executable, "-m", "service", "serve", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--model-variant {emu3.5,emu3.5-image}" in help_text


def test_quickstart_names_the_tiny_cache_folder_the_code_uses():
    from pathlib import Path

    from service.tiny.make import TINY_VERSION

    readme = (Path(__file__).resolve().parents[1] / "docs" / "quickstart.md").read_text()
    assert f"emu35-serve/tiny-v{TINY_VERSION}`" in readme
    assert not [v for v in range(TINY_VERSION) if f"tiny-v{v}`" in readme]
