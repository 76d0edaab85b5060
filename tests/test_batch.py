"""``python -m service generate``'s inputs, sharding and records, without an engine (see
tests/test_batch_engine.py for the runs)."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.batch.cli import generate_main, settings_argv
from service.batch.items import Item, ItemError
from service.batch.job import InputError
from service.batch.jsonl import read_jsonl
from service.batch.records import is_written, write_record
from service.batch.release_config import read_release_config
from service.batch.run import plan_batch
from service.batch.shard import default_worker_id, shard
from service.prompts import Task
from service.types import SamplingOverride
from tests.batch_inputs import write_image, write_jsonl, write_release_config


def by_name(job) -> dict[str, Item | ItemError]:
    return {e.name: e for e in job.entries}


# ---- release configs ------------------------------------------------------------------------------

def test_a_release_config_loads_unchanged_without_the_release(tmp_path, capsys):
    cfg = write_release_config(tmp_path / "example_config_t2i.py", ["a fox", "a bird"], extra="print('hello')")
    before = {k: sys.modules.get(k) for k in ("src", "src.utils", "src.utils.logging_utils")}
    job = read_release_config(cfg, cwd=tmp_path)
    assert {k: sys.modules.get(k) for k in before} == before  # the stand-in is gone again
    assert "hello" in capsys.readouterr().out  # print is the caller's own (the release's logger redirects it)
    assert job.names == ["000", "001"]
    assert job.save_path == tmp_path / "out"
    item = job.entries[0]
    assert isinstance(item, Item) and item.task is Task.T2I and item.question == "a fox"
    o = item.options
    assert (o.cfg_scale, o.max_new_tokens, o.image_area) == (3.0, 512, 128 * 128)
    assert o.text == SamplingOverride(1024, 0.9, 1.0) and o.image == SamplingOverride(5120, 1.0, 1.0)
    # seeds follow the position in the whole list, so a prompt draws the same on any worker
    assert [e.options.seed for e in job.entries] == [6666, 6667]  # type: ignore[union-attr]
    assert (job.paths.model, job.paths.vq_model) == ("BAAI/Emu3.5-Image", "BAAI/Emu3.5-VisionTokenizer")


def test_dict_prompts_are_named_by_their_keys_and_x2i_takes_one_to_three_references(tmp_path):
    refs = [str(write_image(tmp_path / f"r{i}.png")) for i in range(4)]
    prompts = {
        "one": {"prompt": "make it night", "reference_image": refs[0]},
        "three": {"prompt": "combine", "reference_image": refs[:3]},
        "four": {"prompt": "too many", "reference_image": refs},
        "missing": {"prompt": "gone", "reference_image": "nope.png"},
        "text": "a plain string where an image is needed",
        "a/b": {"prompt": "bad name", "reference_image": refs[0]},
    }
    job = read_release_config(write_release_config(tmp_path / "c.py", prompts, task_type="x2i"), cwd=tmp_path)
    e = by_name(job)
    assert isinstance(e["one"], Item) and len(e["one"].image_paths) == 1
    assert isinstance(e["three"], Item) and [str(p) for p in e["three"].image_paths] == refs[:3]
    for name, field, words in (("four", "reference_image", "at most 3"), ("missing", "reference_image", "nope.png"),
                               ("text", "reference_image", "use_image"), ("a/b", "prompts", "file name")):
        err = e[name]
        assert isinstance(err, ItemError) and err.field == field and words in err.reason, err
        assert name in str(err)


def test_relative_reference_paths_are_read_from_the_working_folder_as_the_release(tmp_path):
    write_image(tmp_path / "ref.png")
    cfg = write_release_config(tmp_path / "c.py", [{"prompt": "p", "reference_image": "./ref.png"}], task_type="x2i")
    (item,) = read_release_config(cfg, cwd=tmp_path).entries
    assert isinstance(item, Item) and item.image_paths == (tmp_path / "ref.png",)


@pytest.mark.parametrize("extra, field", [
    ("task_type = 'paint'", "task_type"),
    ("unconditional_type = 'no_image'", "unconditional_type"),
    ("target_height, target_width = 50, 50", "target_height/target_width"),
    ("sampling_params = dict(text_top_p=7.0)", "sampling_params"),
    ("classifier_free_guidance = 'high'", "classifier_free_guidance"),
    ("raise RuntimeError('boom')", "--cfg"),
])
def test_a_setting_the_service_cannot_honour_stops_the_run_naming_the_field(tmp_path, extra, field):
    cfg = write_release_config(tmp_path / "c.py", ["p"])
    cfg.write_text(cfg.read_text() + "\n" + extra + "\n")
    with pytest.raises(InputError) as exc:
        read_release_config(cfg, cwd=tmp_path)
    assert exc.value.field == field
    if field == "--cfg":
        assert "boom" in exc.value.reason


def test_the_release_aspect_table_becomes_an_aspect_ratio(tmp_path):
    cfg = write_release_config(tmp_path / "c.py", ["p"], extra="target_height, target_width = 47, 85")
    (item,) = read_release_config(cfg, cwd=tmp_path).entries
    assert isinstance(item, Item) and item.options.size == "16:9"
    cfg.write_text(cfg.read_text().replace("47, 85", "None, None"))
    (item,) = read_release_config(cfg, cwd=tmp_path).entries
    assert isinstance(item, Item) and item.options.size == "auto"


def test_flags_win_over_the_config_paths_and_missing_folders_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("EMU35_MODEL", raising=False)
    monkeypatch.delenv("EMU35_VQ_MODEL", raising=False)
    (tmp_path / "m").mkdir()
    cfg = write_release_config(tmp_path / "c.py", ["p"])
    cfg.write_text(cfg.read_text().replace('"BAAI/Emu3.5-Image"', repr(str(tmp_path / "m"))))
    job = read_release_config(cfg, cwd=tmp_path)
    with pytest.raises(InputError) as exc:  # vq_path is a hub id, not a folder
        settings_argv(job, [])
    assert exc.value.field == "vq_path"
    argv = settings_argv(job, ["--vq-model", "/v"])
    assert argv == ["--vq-model", "/v", "--model", str(tmp_path / "m")]  # the placeholder tokenizer is left out
    assert settings_argv(job, ["--model=/x", "--vq-model", "/v"]) == ["--model=/x", "--vq-model", "/v"]
    assert settings_argv(job, ["--demo"]) == ["--demo"]


# ---- JSONL ----------------------------------------------------------------------------------------

def test_jsonl_lines_are_generate_requests_with_names_and_image_paths(tmp_path):
    ref = write_image(tmp_path / "ref.png")
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"task": "t2i", "prompt": "a fox", "seed": 3, "aspect_ratio": "1:1", "image_sampling": {"top_k": 7}},
        {"name": "edit", "task": "x2i", "prompt": "night", "images": ["ref.png"]},
        "",
        {"task": "paint", "prompt": "x"},
        {"task": "t2i", "prompt": "x", "sise": "1:1"},
        {"name": "far", "task": "x2i", "prompt": "x", "images": ["missing.png"]},
        {"name": "many", "task": "x2i", "prompt": "x", "images": ["ref.png"] * 4},
        "{not json",
    ])
    e = by_name(read_jsonl(path, cwd=tmp_path))
    assert list(e) == ["000", "edit", "002", "003", "far", "many", "006"]  # blank lines do not count
    first = e["000"]
    assert isinstance(first, Item) and first.options.seed == 3 and first.options.size == "1:1"
    assert first.options.image == SamplingOverride(top_k=7)
    assert isinstance(e["edit"], Item) and e["edit"].image_paths == (ref,)
    for name, field in (("002", "task"), ("003", "sise"), ("far", "images"), ("many", "images"), ("006", None)):
        err = e[name]
        assert isinstance(err, ItemError) and err.field == field, err


def test_jsonl_names_must_be_unique(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"name": "a", "task": "t2i", "prompt": "x"}] * 2)
    with pytest.raises(InputError, match="repeated: a"):
        read_jsonl(path)


# ---- sharding, records ----------------------------------------------------------------------------

@given(n=st.integers(0, 60), workers=st.integers(1, 9))
def test_shards_are_disjoint_and_cover_the_list_as_the_release_deals_them(n, workers):
    names = [f"{i:03d}" for i in range(n)]
    shares = [shard(names, workers, w) for w in range(workers)]
    assert sorted(sum(shares, [])) == names
    assert sum(len(s) for s in shares) == n
    assert all(s == names[w::workers] for w, s in enumerate(shares))


def test_worker_id_defaults_to_the_job_completion_index(monkeypatch):
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert default_worker_id() == 0
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert default_worker_id() == 3
    with pytest.raises(ValueError):
        shard([1, 2], 2, 2)


def test_records_are_written_atomically_and_existing_names_are_skipped(tmp_path):
    write_record(tmp_path, "000", b"record")
    (tmp_path / ".001.abc.tmp").write_bytes(b"half")  # what a kill mid-write leaves
    assert [p.name for p in tmp_path.glob("*.pb")] == ["000.pb"]
    assert is_written(tmp_path, "000") and not is_written(tmp_path, "001")
    entries: list[Item | ItemError] = [Item("000", Task.T2I, "a"), Item("001", Task.T2I, "b"),
                                       ItemError("002", "images", "missing")]
    todo, summary = plan_batch(entries, tmp_path)
    assert [i.name for i in todo] == ["001"]
    assert summary.results["000"].status == "skipped" and summary.results["002"].status == "failed"


# ---- the command before any engine starts ---------------------------------------------------------

@pytest.mark.parametrize("extra, field", [("task_type = 'paint'", "task_type"), ("1/0", "--cfg")])
def test_the_command_refuses_a_bad_config_before_anything_starts(tmp_path, capsys, extra, field):
    cfg = write_release_config(tmp_path / "c.py", ["p"])
    cfg.write_text(cfg.read_text() + extra + "\n")
    assert generate_main(["--cfg", str(cfg), "--demo"]) == 2
    assert f"emu35-generate: {field}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_second_run_with_everything_written_starts_no_engine(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = write_release_config(tmp_path / "c.py", ["a", "b"])
    for name in ("000", "001"):
        write_record(tmp_path / "out" / "proto", name, b"x")
    assert generate_main(["--cfg", str(cfg), "--model", "/nowhere", "--vq-model", "/nowhere"]) == 0
    assert "generated 0, skipped 2, failed 0" in capsys.readouterr().err
    assert '"skipped": 2' in (tmp_path / "out" / "summary.json").read_text()


def test_jsonl_needs_an_out_folder(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"task": "t2i", "prompt": "x"}])
    assert generate_main(["--prompts", str(path), "--demo"]) == 2
    assert "--out" in capsys.readouterr().err


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(caplog):
    from service.batch.progress import BarProgress, LogProgress, make_progress

    bar = make_progress(2, quiet=False, tty=True)
    assert isinstance(bar, BarProgress)
    bar.close()
    lines = make_progress(2, quiet=False, tty=False)
    quiet = make_progress(2, quiet=True, tty=True)
    assert isinstance(lines, LogProgress) and isinstance(quiet, LogProgress)
    with caplog.at_level("INFO", logger="service.batch"):
        lines.done("000", "ok", "1.0 s")
        quiet.done("001", "ok")
        quiet.done("002", "failed", "images: missing")
    text = caplog.text
    assert "[1/2] 000 ok 1.0 s" in text and "img/s" in text and "ETA" in text
    assert "001" not in text and "prompt 002 failed: images: missing" in text


def test_a_release_config_is_fitted_to_the_engine_and_a_jsonl_line_is_not(tmp_path, tiny_dir):
    """The release's example values (1024² px, 5,120 new tokens) run on --demo's 4,096-token context:
    the demo's image area wins and the token cap becomes what the context leaves; a JSONL line's own
    fields are its request, left as asked."""
    from service.batch.cli import service_entries
    from service.prompts import ModelVariant
    from service.settings import load_settings

    demo = load_settings(["--demo", "--model-variant", "emu3.5-image"]).with_demo_defaults(tiny_dir)
    cfg = read_release_config(write_release_config(tmp_path / "c.py", ["p"], image_area=1024 * 1024,
                                                   max_new_tokens=5120), cwd=tmp_path)
    (item,) = service_entries(cfg, cfg.entries, demo)
    assert isinstance(item, Item)
    assert (item.options.image_area, item.options.max_new_tokens) == (None, None)
    assert item.options.variant is ModelVariant.EMU35_IMAGE
    lines = read_jsonl(write_jsonl(tmp_path / "p.jsonl", [
        {"task": "t2i", "prompt": "x", "image_area": 128 * 128, "max_new_tokens": 5000}]))
    (line,) = service_entries(lines, lines.entries, demo)
    assert isinstance(line, Item) and (line.options.image_area, line.options.max_new_tokens) == (128 * 128, 5000)
    full = load_settings(["--model", "/m", "--vq-model", "/v", "--max-model-len", "8192"])
    (kept,) = service_entries(cfg, cfg.entries, full)
    assert isinstance(kept, Item) and (kept.options.image_area, kept.options.max_new_tokens) == (1024 * 1024, 5120)


def test_an_engine_that_cannot_start_fails_every_prompt_in_the_summary(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"name": "a", "task": "t2i", "prompt": "x"}])
    out = tmp_path / "out" / "proto"
    argv = ["--prompts", str(path), "--out", str(out), "--model", str(tmp_path / "none"), "--vq-model",
            str(tmp_path / "none"), "--engine", "reference", "--quiet"]
    assert generate_main(argv) == 1
    assert "failed 1" in capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "summary.json").read_text())["prompts"]["a"]
    assert result["status"] == "failed" and "the engine failed" in result["reason"]
