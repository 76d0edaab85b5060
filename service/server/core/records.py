"""Where finished records live when ``--output-dir`` is set: ``<dir>/<id>.pb``, written atomically."""

from __future__ import annotations

import re
from pathlib import Path

from service.atomic_file import write_atomically

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def valid_record_id(record_id: str) -> bool:
    """Ids the service issues; anything else (path separators, ``..``) is refused before touching disk."""
    return bool(_ID.match(record_id)) and ".." not in record_id


class RecordStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, record_id: str) -> Path:
        if not valid_record_id(record_id):
            raise ValueError(f"invalid record id {record_id!r}")
        return self.folder / f"{record_id}.pb"

    def save(self, record_id: str, data: bytes) -> Path:
        """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
        target = self.path(record_id)
        write_atomically(target, data)
        return target

    def load(self, record_id: str) -> bytes | None:
        p = self.path(record_id)
        return p.read_bytes() if p.is_file() else None
