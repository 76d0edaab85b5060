"""deploy/batch/: the Indexed Job of ``emu35-generate``, rendered and validated like the rest of deploy/
(tests/test_deploy.py's helpers), and tied to the command and to the service's own overlays."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from service.batch.cli import _parser
from service.batch.items import Item
from service.batch.jsonl import read_jsonl
from tests.test_deploy import ACCELERATOR, DEPLOY, OVERLAYS, ROOT, container, objects, one, render, validate_k8s

BATCH = DEPLOY / "batch"


def batch_objects(overlay: str) -> tuple[dict, ...]:
    return render(str(BATCH / "overlays" / overlay))


def job_container(objs) -> dict:
    return one(objs, "Job")["spec"]["template"]["spec"]["containers"][0]


def config_map(objs, prefix: str) -> dict:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix)]
    return cm


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_batch_overlay_renders_valid_objects(overlay):
    objs = batch_objects(overlay)
    assert {o["kind"] for o in objs} == {"Job", "PersistentVolumeClaim", "ConfigMap"}
    for obj in objs:
        validate_k8s(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_job_is_indexed_and_its_workers_are_its_completions(overlay):
    job = one(batch_objects(overlay), "Job")["spec"]
    assert job["completionMode"] == "Indexed"
    c = job_container(batch_objects(overlay))
    args = _parser().parse_known_args(c["args"])
    parsed, rest = args
    assert rest == [] and parsed.worker_id is None  # the worker id comes from JOB_COMPLETION_INDEX
    assert job["completions"] == job["parallelism"] == parsed.num_workers > 1
    assert job["template"]["spec"]["restartPolicy"] == "Never"


def test_the_command_is_the_project_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["emu35-generate"] == "service.__main__:generate_entry"
    assert job_container(batch_objects("a2"))["command"] == ["emu35-generate"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_and_devices_are_the_deployments(overlay):
    """Each pod has what one service replica has: the same image and the same accelerator requests."""
    ours, theirs = job_container(batch_objects(overlay)), container(objects(overlay))
    assert ours["image"] == theirs["image"] and ours["image"].endswith(f":{overlay}")
    assert ours["resources"] == theirs["resources"]
    accel = {k: v for k, v in ours["resources"]["limits"].items() if "/" in k}
    tp = config_map(batch_objects(overlay), "emu35-batch-settings")["data"]["EMU35_TENSOR_PARALLEL_SIZE"]
    assert accel == {ACCELERATOR[overlay]: tp}


def test_volumes_prompts_and_output_fit_the_command():
    objs = batch_objects("a2")
    c = job_container(objs)
    parsed, _ = _parser().parse_known_args(c["args"])
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in one(objs, "Job")["spec"]["template"]["spec"]["volumes"]}
    # the prompts file is the ConfigMap's key, mounted where --prompts reads it
    assert Path(mounts["prompts"]["mountPath"]) / parsed.prompts.name == parsed.prompts
    assert parsed.prompts.name in config_map(objs, "emu35-batch-prompts")["data"]
    assert volumes["prompts"]["configMap"]["name"].startswith("emu35-batch-prompts")
    # every pod writes into one shared volume
    assert parsed.out.is_relative_to(mounts["output"]["mountPath"]) and not mounts["output"].get("readOnly")
    pvc = [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    assert [p["spec"]["accessModes"] for p in pvc] == [["ReadWriteMany"]]
    assert volumes["output"]["persistentVolumeClaim"]["claimName"] == pvc[0]["metadata"]["name"]
    assert volumes["weights"]["persistentVolumeClaim"]["claimName"] == "emu35-weights"  # the service's claim


def test_the_example_prompts_and_settings_are_valid(tmp_path, monkeypatch):
    from service.settings import Settings

    objs = batch_objects("a2")
    (tmp_path / "prompts.jsonl").write_text(config_map(objs, "emu35-batch-prompts")["data"]["prompts.jsonl"])
    job = read_jsonl(tmp_path / "prompts.jsonl")
    assert job.entries and all(isinstance(e, Item) for e in job.entries)
    for name in [k for k in os.environ if k.startswith("EMU35_")]:
        monkeypatch.delenv(name)
    for name, value in config_map(objs, "emu35-batch-settings")["data"].items():
        if name.startswith("EMU35_"):
            monkeypatch.setenv(name, value)
    assert Settings().engine_kind == "vllm"
