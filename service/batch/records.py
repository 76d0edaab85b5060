"""The output folder: one ``{name}.pb`` per prompt, written atomically, found by name on a re-run.

A record is written to a temporary file beside its final name and renamed into place, so a run killed
mid-write leaves no truncated ``.pb`` for the next run to mistake for a finished prompt.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

RECORD_SUFFIX = ".pb"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def record_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}{RECORD_SUFFIX}"


def is_written(out_dir: Path, name: str) -> bool:
    """A record of this name exists (the release's skip rule)."""
    return record_path(out_dir, name).is_file()


def write_record(out_dir: Path, name: str, data: bytes) -> Path:
    """Write ``data`` as ``{name}.pb`` atomically (temporary file, fsync, rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = record_path(out_dir, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a record is as readable as any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final
