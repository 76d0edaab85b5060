"""``make-tiny``: build (once, cached) the tiny model, tokenizer and VQ checkpoints used by tests and the demo.

Layout of ``OUT_DIR``: ``model/`` (Emu3 config.json + safetensors + generation_config.json),
``tokenizer/`` (upstream file layout), ``vq/`` (config.yaml + model.ckpt), with ``flashar=True`` also
``flashar/`` (a FlashAR checkpoint made from ``model/``), and ``manifest.json``, which
records the seed and the maker's version. A folder whose manifest matches is reused as it is, so the
first test session pays the build (well under two minutes) and later ones pay nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

#: Bump when the tiny checkpoints change, so stale caches are rebuilt.
TINY_VERSION = 3  # 2: the tiny VQ has the real widths (embed_dim and z_channels 256) and flags; 3: howto answers have two images
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    root = os.environ.get("EMU35_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "emu35-serve"
    )
    return Path(root) / f"tiny-v{TINY_VERSION}"


def is_complete(out_dir: Path, seed: int) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("version") == TINY_VERSION and manifest.get("seed") == seed


@contextlib.contextmanager
def atomic_folder(out_dir: Path, prefix: str) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` to build into; when the block ends without an error it replaces
    ``out_dir``, so a reader never sees a half-built cache (the temporary folder is removed either way)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def make_tiny(out_dir: str | Path, seed: int = 0, force: bool = False, flashar: bool = False) -> Path:
    """Write the tiny checkpoints into ``out_dir`` (atomically: built in a sibling temp dir, then renamed);
    ``flashar`` adds ``out_dir/flashar/`` (see :func:`ensure_tiny_flashar`)."""
    if flashar:
        make_tiny(out_dir, seed, force)
        ensure_tiny_flashar(Path(out_dir), seed, force)
        return Path(out_dir)
    from service.tiny.lm import write_tiny_lm
    from service.tiny.tokenizer_files import write_tokenizer
    from service.tiny.vq import make_tiny_vq
    from service.tokenizer import Emu35Tokenizer

    out_dir = Path(out_dir)
    if not force and is_complete(out_dir, seed):
        return out_dir
    with atomic_folder(out_dir, ".tiny-") as tmp:
        started = time.monotonic()
        tok = Emu35Tokenizer.from_dir(write_tokenizer(tmp / "tokenizer"))
        write_tiny_lm(tmp / "model", tok, seed=seed)
        make_tiny_vq(tmp / "vq", seed=seed)
        manifest = {"version": TINY_VERSION, "seed": seed, "build_seconds": round(time.monotonic() - started, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def ensure_tiny(seed: int = 0) -> Path:
    """The cached tiny checkpoints, built on first use."""
    return make_tiny(default_cache_dir(), seed=seed)


def ensure_tiny_flashar(out_dir: Path, seed: int = 0, force: bool = False) -> Path:
    """``out_dir/flashar/``: the tiny FlashAR checkpoint, made from ``out_dir/model`` once (it is rebuilt
    with the tiny model, whose manifest it copies)."""
    from service.tiny.flashar import write_tiny_flashar

    target = out_dir / "flashar"
    if force or not is_complete(target, seed):
        with atomic_folder(target, ".tiny-flashar-") as tmp:
            write_tiny_flashar(out_dir / "model", tmp, seed=seed)
            (tmp / MANIFEST).write_text(json.dumps({"version": TINY_VERSION, "seed": seed}, indent=2) + "\n")
    return target
