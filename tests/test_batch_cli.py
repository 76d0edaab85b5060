"""The ``python -m service generate`` command as a user runs it: a process on the tiny model, its exit
status, its log lines and its summary (one engine start; the runs themselves are in test_batch_engine.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.record.visualise import load_story
from tests.batch_inputs import write_jsonl, write_release_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[1]


def test_the_command_reports_each_prompt_and_exits_non_zero_when_one_failed(tmp_path):
    pytest.importorskip("vllm")
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"name": "fox", "task": "t2i", "prompt": "a fox", "seed": 1, "image_area": 128 * 128},
        {"name": "lost", "task": "x2i", "prompt": "night", "images": ["nowhere.png"]},
    ])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("JOB_COMPLETION_INDEX", None)
    done = subprocess.run([sys.executable, "-m", "service", "generate", "--prompts", str(prompts), "--out",
                           str(tmp_path / "out" / "proto"), "--demo", "--max-concurrent", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = done.stderr
    assert done.returncode == 1, log[-3000:]
    assert "prompt lost failed (images)" in log and "nowhere.png" in log  # named before the engine starts
    assert "[1/1] fox ok" in log  # plain lines, not a bar: stderr is not a terminal
    assert "generated 1, skipped 0, failed 1" in log
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["prompts"]["fox"]["status"] == "ok" and summary["prompts"]["fox"]["tokens"] > 0
    assert summary["prompts"]["lost"]["status"] == "failed" and summary["prompts"]["lost"]["field"] == "images"
    assert load_story(tmp_path / "out" / "proto" / "fox.pb").question == "a fox"
    assert sorted(p.name for p in (tmp_path / "out" / "proto").iterdir()) == ["fox.pb"]


def test_one_image_from_a_release_config_is_three_lines_what_was_loaded_progress_summary(tmp_path):
    """Issue 29: ``emu35-generate --cfg … --demo`` wrote 84 lines for one image, 57 of them vLLM's start-up
    lines. vLLM is kept at warnings (less those the service causes on purpose); what is left is the loaded
    line, the progress and the summary, plus at most the two lines the engine processes print before any
    logging is configured there (which no level reaches)."""
    pytest.importorskip("vllm")
    cfg = write_release_config(tmp_path / "example_config_t2i.py", ["a red circle"], save_path=str(tmp_path / "out"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}
    for name in ("JOB_COMPLETION_INDEX", "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_CONFIG_PATH", "PYTHONWARNINGS"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "service", "generate", "--cfg", str(cfg), "--demo"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""  # vLLM logged to stdout
    lines = done.stderr.splitlines()
    ours = [line for line in lines if "INFO service." in line or line.startswith("emu35-generate:")]
    # what is printed before any logging is configured: vLLM 0.32's Triton probe, torch's CUDA_HOME note
    # on vLLM 0.11, once in each engine process
    early = [line for line in lines if line not in ours]
    assert len(ours) == 3 and len(early) <= 2, "\n".join(lines)
    assert all("Triton" in line or "CUDA" in line for line in early), "\n".join(early)
    assert "INFO service.batch: loaded the demo's tiny model on the vllm engine" in ours[0]
    assert "1 to generate into" in ours[0]
    assert "INFO service.batch: [1/1] 000 ok" in ours[1]
    assert ours[2].startswith("emu35-generate: generated 1, skipped 0, failed 0; summary ")
