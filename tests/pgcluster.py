"""A throwaway PostgreSQL cluster for tests: initdb into a temporary folder, pg_ctl start on loopback
(and a unix socket in that folder), stopped and removed afterwards.

Started with Debian's server binaries (``make test`` installs them: scripts/install-postgresql.sh). As
root (CI containers) the cluster runs as the ``postgres`` user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest


def pg_bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_cluster_user(cmd: list[str]) -> list[str]:
    if os.getuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A running cluster; yields a ``postgresql://`` URL of its ``postgres`` database (trust auth)."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed (make postgresql)")
    root = Path(tempfile.mkdtemp(prefix="emu35-pg-"))
    data = root / "data"
    if os.getuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    user = "postgres"
    run = lambda *args: subprocess.run(_as_cluster_user([str(bindir / args[0]), *args[1:]]),  # noqa: E731
                                       check=True, capture_output=True, text=True)
    run("initdb", "-D", str(data), "-U", user, "-A", "trust", "--no-sync", "-E", "UTF8")
    port = _free_port()
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=100"
    run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start")
    try:
        yield f"postgresql://{user}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_cluster_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """Create database ``name`` in the cluster at ``url``; its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name
