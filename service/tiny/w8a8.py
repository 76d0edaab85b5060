"""The tiny model quantised to W8A8 with ``python -m service quantize`` (built once, cached).

Real Emu3.5 checkpoints are bf16 with the tokenizer files in the model folder, so the tiny model is
first copied in that form (``bf16/``: weights cast to bf16, tokenizer files beside them), then
quantised on CPU with the packaged configuration into ``w8a8/``. The quantiser's output is kept in
``quantize.log`` (tests read which msModelSlim adapter ran). Cached beside the tiny checkpoints and
rebuilt when the tiny model, this recipe or the calibration changes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from service.tiny.make import TINY_VERSION, atomic_folder, default_cache_dir, ensure_tiny
from service.tokenizer import TIKTOKEN_FILE, VISION_FILE

#: Bump when the recipe changes, so cached outputs are rebuilt.
W8A8_VERSION = 1
MANIFEST = "manifest.json"


def write_bf16_copy(model: Path, tokenizer: Path, out: Path) -> Path:
    """``model`` with bf16 weights and the tokenizer files in the folder (the release's layout)."""
    out.mkdir(parents=True)
    for file in model.iterdir():
        if file.suffix == ".safetensors":
            tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(file)).items()}
            save_file(tensors, str(out / file.name), metadata={"format": "pt"})
        elif file.name == "config.json":
            config = json.loads(file.read_text())
            config["torch_dtype"] = "bfloat16"
            (out / file.name).write_text(json.dumps(config, indent=2) + "\n")
        elif file.is_file():
            shutil.copyfile(file, out / file.name)
    for name in (TIKTOKEN_FILE, VISION_FILE):
        shutil.copyfile(tokenizer / name, out / name)
    return out


def make_tiny_w8a8(out_dir: Path, tiny: Path) -> Path:
    """Build ``out_dir/{bf16,w8a8,quantize.log}`` atomically; raises with the log tail on failure."""
    with atomic_folder(out_dir, ".tiny-w8a8-") as tmp:
        bf16 = write_bf16_copy(tiny / "model", tiny / "tokenizer", tmp / "bf16")
        started = time.monotonic()
        log = tmp / "quantize.log"
        with log.open("wb") as sink:
            done = subprocess.run([sys.executable, "-m", "service", "quantize", "--model", str(bf16),
                                   "--out", str(tmp / "w8a8"), "--device", "cpu"],
                                  stdout=sink, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"quantising the tiny model failed (exit {done.returncode}):\n{tail}")
        manifest = {"version": W8A8_VERSION, "tiny_version": TINY_VERSION,
                    "quantize_seconds": round(time.monotonic() - started, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def ensure_tiny_w8a8() -> Path:
    """The cached folder (``bf16/``, ``w8a8/``, ``quantize.log``), built on first use (≈ 15 s on 2 cores)."""
    tiny = ensure_tiny()
    out = default_cache_dir().parent / f"tiny-v{TINY_VERSION}-w8a8-v{W8A8_VERSION}"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("version") == W8A8_VERSION and manifest.get("tiny_version") == TINY_VERSION:
            return out
    except (OSError, ValueError):
        pass
    return make_tiny_w8a8(out, tiny)
