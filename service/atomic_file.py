"""One file written so that a reader never sees half of it: a temporary file in the same folder, fsync,
then a rename. Records are written this way by the HTTP layer (``--output-dir``) and by the batch
command, whose resume rule ("a name already written is done") depends on it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, with the permissions an ordinary new file would get
    (``mkstemp`` alone makes 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
