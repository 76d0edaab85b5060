"""The output folder: one ``{name}.pb`` per prompt, written atomically, found by name on a re-run.

A record is written to a temporary file beside its final name and renamed into place, so a run killed
mid-write leaves no truncated ``.pb`` for the next run to mistake for a finished prompt.
"""

from __future__ import annotations

from pathlib import Path

from service.atomic_file import write_atomically

RECORD_SUFFIX = ".pb"


def record_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}{RECORD_SUFFIX}"


def is_written(out_dir: Path, name: str) -> bool:
    """A record of this name exists (the release's skip rule)."""
    return record_path(out_dir, name).is_file()


def write_record(out_dir: Path, name: str, data: bytes) -> Path:
    """Write ``data`` as ``{name}.pb`` atomically (temporary file, fsync, rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = record_path(out_dir, name)
    write_atomically(final, data)
    return final
