"""docker/install.sh (the A2/A3 images' install step) run into an environment that already holds the
vllm-ascend v0.11.0rc3 image's torch 2.7.1: the torch stays exactly where it is, the service imports.

The environment is the 0.11 lane's (.venv-vllm011: vLLM 0.11.0 on torch 2.7.1, Python 3.11, built by
scripts/build-vllm011-env.sh), seen read-only from a fresh venv through a path entry, so the script
adds to that venv only and nothing is downloaded but what the base lacks (from pip's cache)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.serverproc import REPO

BASE_TORCH = "2.7.1"
LANE = Path(os.environ.get("EMU35_VLLM011_ENV", REPO / ".venv-vllm011"))


def _python_of(env: Path) -> Path:
    return env / "bin" / "python"


def _site_packages(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
def test_install_sh_keeps_the_base_torch_and_imports_the_service(tmp_path):
    if not (LANE / ".installed").is_file():
        pytest.skip(f"{LANE} is not built (make install-vllm011)")
    base_python = _python_of(LANE)
    version = subprocess.run([str(base_python), "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith(BASE_TORCH), f"the 0.11 lane must hold torch {BASE_TORCH}, not {version}"
    env = tmp_path / "image"
    subprocess.run([str(base_python), "-m", "venv", str(env)], check=True)
    python = _python_of(env)
    Path(_site_packages(python), "base-image.pth").write_text(_site_packages(base_python) + "\n")
    script = ("source docker/install.sh && unset PIP_NO_CACHE_DIR && cd / && "
              "check_base_deps && install_packages && check_installed")
    done = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": str(python), "PATH": f"{env / 'bin'}:{os.environ['PATH']}",
                               "PYTHONPATH": ""})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    probe = ("import torch, service.settings, service.engine.in_vllm.plugin as p; "
             "print(torch.__version__); print(torch.__file__); print(p.__file__)")
    torch_version, torch_file, plugin_file = subprocess.run(
        [str(python), "-c", probe], cwd="/", capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": ""}).stdout.split()
    assert torch_version == version  # not moved
    assert torch_file.startswith(_site_packages(base_python))  # still the base's copy, none added
    assert plugin_file.startswith(_site_packages(python))  # the service as installed, not the source tree
