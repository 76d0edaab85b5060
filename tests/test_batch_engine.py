"""``python -m service generate`` on the tiny model through one vLLM engine (started once for the
module): release configs (a list, a dict, X2I with one and three references), JSONL, skipping, resuming
after a kill, shards, and every bad-input case, each failing alone while the rest goes on."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from service.batch.items import Item, ItemError
from service.batch.jsonl import read_jsonl
from service.batch.progress import LogProgress
from service.batch.release_config import read_release_config
from service.batch.run import BatchSummary, plan_batch, run_batch, started_runner
from service.batch.shard import shard
from service.record.visualise import load_story, vis_main
from service.settings import load_settings
from tests.batch_inputs import write_image, write_jsonl, write_release_config
from tests.test_vllm_engine import LoopThread

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

#: Small images (an 8×8-token grid on the tiny VQ): the tests are about the batch, not the pictures.
AREA = 128 * 128


@pytest.fixture(scope="module")
def engine(tiny_dir):
    """(loop thread, runner): one engine and VQ worker for the module, up to 4 pairs at once."""
    pytest.importorskip("vllm")
    settings = load_settings(["--demo", "--max-concurrent", "4"]).with_demo_defaults(tiny_dir)
    loop = LoopThread()
    cm = started_runner(settings, image_area=AREA)
    runner = loop.run(cm.__aenter__())
    yield loop, runner
    loop.run(cm.__aexit__(None, None, None))
    loop.close()


def run(engine, entries: list[Item | ItemError], out: Path, concurrent: int = 4) -> BatchSummary:
    loop, runner = engine
    todo, summary = plan_batch(entries, out)
    return loop.run(run_batch(runner, todo, out, summary, concurrent, LogProgress(len(todo))))


def statuses(summary: BatchSummary) -> dict[str, str]:
    return {name: r.status for name, r in summary.results.items()}


def test_release_configs_run_and_a_second_run_skips_everything(engine, tmp_path):
    # a list of T2I prompts
    t2i = read_release_config(write_release_config(tmp_path / "t2i.py", ["a fox", "a bird", "a tree"],
                                                   save_path="t2i", image_area=AREA), cwd=tmp_path)
    assert t2i.save_path is not None
    out = t2i.save_path / "proto"
    summary = run(engine, t2i.entries, out)
    assert statuses(summary) == {"000": "ok", "001": "ok", "002": "ok"}
    assert all(r.tokens > 0 and r.seconds > 0 for r in summary.results.values())
    story = load_story(out / "001.pb")
    assert story.question == "a bird" and len(story.clips) >= 1
    # vis reads the output folder as the release's visualiser would
    assert vis_main([str(out), "--out", str(tmp_path / "vis")]) == 0
    assert (tmp_path / "vis" / "000" / "000_question.txt").read_text() == "a fox\n"
    assert list((tmp_path / "vis" / "002").glob("*_image.png"))
    # a second run generates nothing
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.pb")}
    todo, again = plan_batch(t2i.entries, out)
    assert todo == [] and statuses(again) == {"000": "skipped", "001": "skipped", "002": "skipped"}
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.pb")} == before


def test_x2i_dict_config_with_one_and_three_references_and_every_bad_input(engine, tmp_path):
    refs = [str(write_image(tmp_path / f"r{i}.png", colour=(60 * i, 90, 200))) for i in range(4)]
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    prompts = {
        "one": {"prompt": "make it night", "reference_image": refs[0]},
        "three": {"prompt": "combine them", "reference_image": refs[:3]},
        "missing": {"prompt": "x", "reference_image": "nowhere.png"},
        "unreadable": {"prompt": "x", "reference_image": str(tmp_path / "broken.png")},
        "four": {"prompt": "x", "reference_image": refs},
        "too_long": {"prompt": "word " * 6000, "reference_image": refs[0]},
    }
    job = read_release_config(write_release_config(tmp_path / "x2i.py", prompts, task_type="x2i", save_path="x2i",
                                                   image_area=AREA), cwd=tmp_path)
    out = tmp_path / "x2i" / "proto"
    summary = run(engine, job.entries, out)
    assert statuses(summary) == {"one": "ok", "three": "ok", "missing": "failed", "unreadable": "failed",
                                 "four": "failed", "too_long": "failed"}
    why = {n: (r.field, r.reason) for n, r in summary.results.items() if r.status == "failed"}
    assert why["missing"][0] == "reference_image" and "nowhere.png" in str(why["missing"][1])
    assert why["unreadable"][0] == "reference_image" and "broken.png" in str(why["unreadable"][1])
    assert why["four"][0] == "reference_image" and "at most 3" in str(why["four"][1])
    assert why["too_long"][0] == "prompt" and "context" in str(why["too_long"][1])
    assert sorted(p.name for p in out.glob("*.pb")) == ["one.pb", "three.pb"]
    assert len(load_story(out / "three.pb").reference_images) == 3


def test_jsonl_with_an_unknown_task_runs_the_other_lines(engine, tmp_path):
    write_image(tmp_path / "ref.png")
    job = read_jsonl(write_jsonl(tmp_path / "p.jsonl", [
        {"name": "fox", "task": "t2i", "prompt": "a fox", "seed": 1, "image_area": AREA},
        {"name": "edit", "task": "x2i", "prompt": "night", "images": ["ref.png"], "image_area": AREA},
        {"name": "bad", "task": "paint", "prompt": "x"},
    ]), cwd=tmp_path)
    summary = run(engine, job.entries, tmp_path / "proto")
    assert statuses(summary) == {"bad": "failed", "fox": "ok", "edit": "ok"}
    assert summary.results["bad"].field == "task"
    assert load_story(tmp_path / "proto" / "edit.pb").question == "night"


def test_a_run_killed_part_way_resumes_and_completes_the_rest(engine, tmp_path):
    loop, runner = engine
    job = read_release_config(write_release_config(tmp_path / "c.py", [f"prompt {i}" for i in range(4)],
                                                   image_area=AREA), cwd=tmp_path)
    out = tmp_path / "out" / "proto"
    todo, summary = plan_batch(job.entries, out)
    future = asyncio.run_coroutine_threadsafe(run_batch(runner, todo, out, summary, 1, LogProgress(4)), loop.loop)
    deadline = time.monotonic() + 300
    while not list(out.glob("*.pb")) and time.monotonic() < deadline:
        time.sleep(0.02)
    future.cancel()  # the kill: in-flight generations are aborted, nothing half-written stays
    time.sleep(0.5)
    first = sorted(p.name for p in out.glob("*.pb"))
    assert 1 <= len(first) < 4, first
    assert not [p for p in out.iterdir() if not p.name.endswith(".pb")]  # no temporary files left
    resumed = run(engine, job.entries, out)
    assert sorted(n for n, s in statuses(resumed).items() if s == "skipped") == [p[:-3] for p in first]
    assert sorted(p.name for p in out.glob("*.pb")) == ["000.pb", "001.pb", "002.pb", "003.pb"]


def test_two_shards_write_disjoint_names_whose_union_is_the_list(engine, tmp_path):
    job = read_release_config(write_release_config(tmp_path / "c.py", [f"p{i}" for i in range(5)],
                                                   image_area=AREA), cwd=tmp_path)
    out = tmp_path / "out" / "proto"
    written = []
    for worker in (0, 1):
        before = {p.name for p in out.glob("*.pb")} if out.exists() else set()
        run(engine, shard(job.entries, 2, worker), out)
        written.append({p.name for p in out.glob("*.pb")} - before)
    assert written[0] == {"000.pb", "002.pb", "004.pb"} and written[1] == {"001.pb", "003.pb"}
