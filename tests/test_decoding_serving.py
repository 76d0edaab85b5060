"""Decoding schedules at the service's edge (issue 30): the ``decoding`` object of the Emu3.5 routes, the
OpenAI ``extra_body`` and batch lines reaches the engine's request; what the serving engine does not offer,
or a field out of range, is a 400 naming the field before any work; ``--decoding`` is the server's default
and is refused at start when the engine lacks it; ``/v1/models`` lists the schedules; ``timings`` gains
``tokens_per_pass``; and engine selection is one table (checkpoint kinds × engines).

The HTTP tests run the real app in-process (tiny tokenizer and VQ) around a scripted engine that offers
every schedule and says how many passes each delta took, so they need neither vLLM nor the native engine.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import AsyncGenerator

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from service.settings import Settings, load_settings
from service.task import DecodingChoice, PlanError, resolve_decoding
from service.token_layout import image_ids
from service.types import (
    DECODING_MODES,
    MAX_DRAFT_LEN,
    MAX_WINDOW,
    Decoding,
    EngineStats,
    GenerationRequest,
    TokenDelta,
)

# ---- the task layer's resolution: request, server default, engine -------------------------------------


def test_a_request_without_decoding_gets_the_server_default_or_the_engines_first():
    assert resolve_decoding(None, None, ("ar",)) == Decoding("ar")
    assert resolve_decoding(None, None, ("jacobi", "ar")) == Decoding("jacobi")
    server = Decoding("zipar", 4, 8)
    assert resolve_decoding(None, server, DECODING_MODES) == server
    # a missing field is the server's for the same mode; another mode starts from the engine's defaults
    assert resolve_decoding(DecodingChoice(window=16), server, DECODING_MODES) == Decoding("zipar", 4, 16)
    assert resolve_decoding(DecodingChoice("jacobi"), server, DECODING_MODES) == Decoding("jacobi")
    assert resolve_decoding(DecodingChoice("jacobi", 8), None, DECODING_MODES) == Decoding("jacobi", 8)


@pytest.mark.parametrize("choice,schedules,param,words", [
    (DecodingChoice("jacobi"), ("ar",), "decoding.mode", "not offered by the vllm engine, which offers ar"),
    (DecodingChoice("zipar", window=4), ("ar",), "decoding.mode", "not offered"),
    (DecodingChoice("beam"), DECODING_MODES, "decoding.mode", "must be one of"),
    (DecodingChoice("ar", draft_len=4), DECODING_MODES, "decoding.draft_len", "not ar"),
    (DecodingChoice("jacobi", window=4), DECODING_MODES, "decoding.window", "zipar mode only"),
    (DecodingChoice("jacobi", draft_len=MAX_DRAFT_LEN + 1), DECODING_MODES, "decoding.draft_len", r"in \[1"),
    (DecodingChoice("ar"), (), "decoding", "its own schedule"),  # FlashAR: nothing to choose
])
def test_what_the_engine_cannot_do_is_a_plan_error_naming_the_field(choice, schedules, param, words):
    with pytest.raises(PlanError, match=words) as exc:
        resolve_decoding(choice, None, schedules, "vllm")
    assert exc.value.param == param


@hsettings(max_examples=300, deadline=None)
@given(mode=st.one_of(st.none(), st.sampled_from(DECODING_MODES), st.text(max_size=6)),
       draft_len=st.one_of(st.none(), st.integers(-3, MAX_DRAFT_LEN + 3)),
       window=st.one_of(st.none(), st.integers(-3, MAX_WINDOW + 3)),
       schedules=st.lists(st.sampled_from(DECODING_MODES), unique=True).map(tuple),
       default=st.one_of(st.none(), st.sampled_from(DECODING_MODES)))
def test_resolution_gives_an_offered_valid_schedule_or_a_plan_error(mode, draft_len, window, schedules, default):
    """Whatever a client sends: a schedule the engine offers, with the asked fields kept, or a PlanError
    whose param names a decoding field (never another exception, which would be a 500)."""
    server = Decoding(default) if default is not None and default in schedules else None  # type: ignore[arg-type]
    choice = DecodingChoice(mode, draft_len, window)
    try:
        got = resolve_decoding(choice, server, schedules)
    except PlanError as exc:
        assert exc.param is not None and exc.param.startswith("decoding")
        return
    assert schedules and got.mode in schedules
    assert got.mode == (mode or (server.mode if server else schedules[0]))
    assert (draft_len is None or got.draft_len == draft_len) and (window is None or got.window == window)


# ---- settings ------------------------------------------------------------------------------------------


def test_decoding_flags_make_the_server_default():
    s = load_settings(["--demo", "--engine", "native", "--decoding", "zipar", "--draft-len", "2", "--window", "8"])
    assert s.engine_kind == "native" and s.default_decoding == Decoding("zipar", 2, 8)
    assert load_settings(["--demo"]).default_decoding is None


@pytest.mark.parametrize("argv,words", [
    (["--window", "8"], "set --decoding"),
    (["--decoding", "jacobi", "--window", "8"], "--window applies to the zipar mode only"),
    (["--decoding", "ar", "--draft-len", "4"], "--draft-len applies"),
    (["--decoding", "jacobi", "--draft-len", "0"], "draft_len"),
    (["--decoding", "beam"], "decoding"),
])
def test_a_decoding_flag_the_mode_does_not_take_is_refused(argv, words):
    with pytest.raises(ValueError, match=words):
        load_settings(["--demo", *argv])


def test_serve_refuses_a_default_schedule_its_engine_lacks(capsys, tiny_dir, monkeypatch):
    """``--decoding jacobi`` on the vLLM (or reference) engine: exit 2 naming the flag, before loading."""
    import service.server.run as run
    from service.tiny.make import ensure_tiny

    class NeverServe:
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("the server started: the schedule was not refused")

    monkeypatch.setattr(run, "DrainingServer", NeverServe)
    assert run.serve_main(["--demo", "--engine", "reference", "--decoding", "jacobi"],
                      prepare=lambda s: s.with_demo_defaults(ensure_tiny())) == 2
    err = capsys.readouterr().err
    assert "--decoding" in err and "'jacobi' is not a schedule of the reference engine, which offers ar" in err


# ---- engine selection: one table -------------------------------------------------------------------------


def test_engine_selection_table(tiny_dir):
    from service.task import CheckpointError, check_model, engine_name, model_kind, serving_engine
    from service.tiny.make import ensure_tiny_flashar

    flashar = ensure_tiny_flashar(tiny_dir)
    demo = Settings(demo=True).with_demo_defaults(tiny_dir)
    assert model_kind(demo) == "emu3.5" and engine_name(demo) == demo.engine_kind
    reference = demo.model_copy(update={"engine": "reference"})
    assert serving_engine(reference).name == "reference" and serving_engine(reference).schedules() == ("ar",)
    assert serving_engine(demo.model_copy(update={"engine": "vllm"})).schedules() == ("ar",)
    own = demo.model_copy(update={"model": flashar})
    assert model_kind(own) == "flashar" and engine_name(own) == "flashar" and serving_engine(own).schedules() == ()
    check_model(own)
    for engine in ("vllm", "native"):
        with pytest.raises(CheckpointError, match=f"is a FlashAR checkpoint: it runs on its own engine, not {engine} "
                                                  r"\(leave --engine at auto\)"):
            check_model(own.model_copy(update={"engine": engine}))
    with pytest.raises(CheckpointError, match="--decoding|offers none"):
        check_model(own.model_copy(update={"decoding": "ar"}))


# ---- over HTTP, in-process ---------------------------------------------------------------------------------


class ScheduleEngine:
    """Answers every request with one image of its grid (random codes), a row per delta, and says the
    row took ``ceil(tokens / PASS_TOKENS[mode])`` passes; keeps every request it was asked to run."""

    PASS_TOKENS = {"ar": 1, "jacobi": 3, "zipar": 5}

    def __init__(self, tokenizer, schedules: tuple[str, ...] = DECODING_MODES) -> None:
        self.tok = tokenizer
        self.schedules = schedules
        self.requests: list[GenerationRequest] = []
        self.max_model_len = 4096

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    async def self_check(self) -> None: ...

    async def health(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0.0, 0, 0, 0)

    def check(self, req: GenerationRequest) -> None:
        self.requests.append(req)

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        h, w = req.target_grid or (4, 4)
        codes = np.random.default_rng(req.seed).integers(0, 1000, (h, w))
        ids = [self.tok.ids.boi] + image_ids(self.tok, codes)[1:]
        per = self.PASS_TOKENS[req.decoding.mode]
        head = len(ids) - h * (w + 1)
        chunks = [ids[:head]] + [ids[head + r * (w + 1): head + (r + 1) * (w + 1)] for r in range(h)]
        for i, chunk in enumerate(chunks):
            yield TokenDelta(chunk, "stop" if i == len(chunks) - 1 else None,
                             decode_steps=len(chunk) if i == 0 else math.ceil(len(chunk) / per))
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None: ...


@pytest.fixture(scope="module")
def tiny_demo(tiny_dir) -> Settings:
    return Settings(demo=True, decoding="jacobi", draft_len=6).with_demo_defaults(tiny_dir)


def serve(settings: Settings, scenario, schedules: tuple[str, ...] = DECODING_MODES):
    """Run ``scenario(client, engine)`` against the app on a started runtime around a ScheduleEngine."""
    from service.server.app import create_app
    from service.server.core.runtime import Runtime

    engines: list[ScheduleEngine] = []

    def factory(s, tok):
        engines.append(ScheduleEngine(tok, schedules))
        return engines[-1]

    async def main():
        runtime = Runtime(settings, engine_factory=factory)
        await runtime.start()
        assert runtime.state == "ready", runtime.error
        try:
            transport = httpx.ASGITransport(app=create_app(settings, runtime))
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                await scenario(client, engines[0])
        finally:
            await runtime.stop()

    asyncio.run(main())


SMALL = "64x64"  # a 4×4-token image


def test_decoding_round_trips_on_every_route_and_timings_count_passes(tiny_demo):
    async def scenario(client: httpx.AsyncClient, engine: ScheduleEngine):
        r = await client.post("/v1/t2i", json={"prompt": "a fox", "size": SMALL, "seed": 1,
                                                "decoding": {"mode": "zipar", "window": 2, "draft_len": 3}})
        assert r.status_code == 200, r.text
        assert engine.requests[-1].decoding == Decoding("zipar", 3, 2)
        timings = r.json()["timings"]
        assert timings["decoding"] == {"mode": "zipar", "draft_len": 3, "window": 2}
        # header ids one per pass, each 5-token row in one pass: 4 rows of 5 ids over 4 passes
        tokens = r.json()["usage"]["completion_tokens"]
        head = tokens - 4 * 5
        assert timings["decode_steps"] == head + 4
        assert timings["tokens_per_pass"] == round(tokens / (head + 4), 3) > 1

        r = await client.post("/v1/t2i", json={"prompt": "a fox", "size": SMALL, "seed": 1})
        assert r.status_code == 200 and engine.requests[-1].decoding == Decoding("jacobi", 6)  # the server's
        assert r.json()["timings"]["decoding"] == {"mode": "jacobi", "draft_len": 6}

        r = await client.post("/v1/images/generations", json={"prompt": "a fox", "size": SMALL, "n": 2,
                                                               "decoding": {"mode": "ar"}})
        assert r.status_code == 200, r.text
        assert [q.decoding for q in engine.requests[-2:]] == [Decoding("ar")] * 2

        r = await client.post("/v1/images/edits", data={"prompt": "red", "decoding": '{"mode": "zipar", "window": 2}'},
                              files={"image": ("a.png", base64_png(), "image/png")})
        assert r.status_code == 200, r.text
        assert engine.requests[-1].decoding == Decoding("zipar", None, 2)

        r = await client.post("/v1/generate", json={"task": "t2i", "prompt": "a fox", "size": SMALL,
                                                     "decoding": {"draft_len": 9}})
        assert r.status_code == 200 and engine.requests[-1].decoding == Decoding("jacobi", 9)

        # streamed: rows come as they complete, previews drawn, done carries the same timings
        r = await client.post("/v1/t2i", json={"prompt": "a fox", "size": SMALL, "seed": 1, "stream": True,
                                                "preview_every_rows": 1, "decoding": {"mode": "zipar", "window": 2}})
        events = [(b.split("\n")[0][len("event: "):], json.loads(b.split("data: ", 1)[1]))
                  for b in r.text.replace("\r\n", "\n").strip().split("\n\n") if b.startswith("event:")]
        names = [n for n, _ in events]
        assert names[0] == "image_start" and names[-2:] == ["image", "done"]
        assert [d["rows"] for n, d in events if n == "image_progress"] == [1, 2, 3, 4]
        assert sum(1 for n, d in events if n == "image_progress" and "b64_json" in d) == 3
        assert events[-1][1]["timings"]["decoding"] == {"mode": "zipar", "draft_len": 1, "window": 2}
        assert events[-1][1]["timings"]["tokens_per_pass"] > 1

        models = (await client.get("/v1/models")).json()["data"][0]
        assert models["schedules"] == list(DECODING_MODES)
        assert models["decoding"] == {"mode": "jacobi", "draft_len": 6}

    serve(tiny_demo, scenario)


def test_batch_lines_carry_decoding(tmp_path):
    from service.batch.jsonl import read_jsonl

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"task": "t2i", "prompt": "a", "decoding": {"mode": "zipar", "window": 3}}) + "\n"
                    + json.dumps({"task": "t2i", "prompt": "b", "decoding": {"mode": "zipar", "window": 0}}) + "\n")
    good, bad = read_jsonl(path).entries
    assert good.options.decoding == DecodingChoice("zipar", None, 3)
    assert bad.field == "decoding.window"


BAD = [
    ({"mode": "beam"}, "decoding.mode"),
    ({"mode": "jacobi", "draft_len": 0}, "decoding.draft_len"),
    ({"mode": "jacobi", "draft_len": MAX_DRAFT_LEN + 1}, "decoding.draft_len"),
    ({"mode": "zipar", "window": MAX_WINDOW + 1}, "decoding.window"),
    ({"mode": "zipar", "window": "4"}, "decoding.window"),
    ({"mode": "ar", "window": 4}, "decoding.window"),
    ({"mode": "ar", "draft_len": 2}, "decoding.draft_len"),
    ({"mode": "ar", "steps": 2}, "decoding.steps"),
    ({"mode": "jacobi"}, "decoding.mode"),  # the engine offers ar only
    ({"mode": "zipar", "window": 8}, "decoding.mode"),
]


def test_bad_decoding_is_a_400_naming_the_field_before_any_work(tiny_dir):
    settings = Settings(demo=True).with_demo_defaults(tiny_dir)

    async def scenario(client: httpx.AsyncClient, engine: ScheduleEngine):
        for decoding, param in BAD:
            for path, extra in (("/v1/t2i", {}), ("/v1/x2i", {"images": [PNG]}), ("/v1/narrative", {}),
                                ("/v1/images/generations", {}), ("/v1/t2i", {"stream": True})):
                r = await client.post(path, json={"prompt": "a", "decoding": decoding, **extra})
                assert r.status_code == 400, (path, decoding, r.text)
                assert r.json()["error"]["param"] == param, (path, decoding, r.json())
            r = await client.post("/v1/images/edits", data={"prompt": "a", "decoding": json.dumps(decoding)},
                                  files={"image": ("a.png", base64_png(), "image/png")})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (decoding, r.text)
        assert engine.requests == []  # nothing reached the engine
        models = (await client.get("/v1/models")).json()["data"][0]
        assert models["schedules"] == ["ar"] and models["decoding"] == {"mode": "ar"} and models["engine"]

    serve(settings, scenario, schedules=("ar",))


def base64_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = __import__("base64").b64encode(base64_png()).decode()


def test_an_engine_with_its_own_order_refuses_any_decoding_and_lists_none(tiny_dir):
    """FlashAR's case: no schedule to choose, so a ``decoding`` object is a 400 naming it, a request
    without one runs, and /v1/models lists no schedules and no default."""
    settings = Settings(demo=True).with_demo_defaults(tiny_dir)

    async def scenario(client: httpx.AsyncClient, engine: ScheduleEngine):
        r = await client.post("/v1/t2i", json={"prompt": "a", "size": SMALL, "decoding": {"mode": "ar"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "decoding"
        assert engine.requests == []
        r = await client.post("/v1/t2i", json={"prompt": "a", "size": SMALL})
        assert r.status_code == 200 and "decoding" not in r.json()["timings"]
        card = (await client.get("/v1/models")).json()["data"][0]
        assert card["schedules"] == [] and "decoding" not in card

    serve(settings, scenario, schedules=())
