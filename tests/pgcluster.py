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


class PgCluster:
    """A throwaway cluster that a test may stop and start again (a database outage), on the same port."""

    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir, self.root, self.port = bindir, root, port
        self.data = root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(_as_cluster_user([str(self.bindir / "pg_ctl"), "-D", str(self.data), *args]),
                       check=check, capture_output=True, text=True)

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=100"
        self._pg_ctl("-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        """Stop at once (as a crash or a failover would): connections are cut, nothing answers."""
        self._pg_ctl("-m", "immediate", "-w", "stop", check=False)


@contextlib.contextmanager
def pg_cluster_control() -> Iterator[PgCluster]:
    """A running cluster (trust auth) that the test can stop and start."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed (make postgresql)")
    root = Path(tempfile.mkdtemp(prefix="emu35-pg-"))
    if os.getuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    subprocess.run(_as_cluster_user([str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "-A", "trust",
                                     "--no-sync", "-E", "UTF8"]), check=True, capture_output=True, text=True)
    cluster = PgCluster(bindir, root, _free_port())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A running cluster; yields a ``postgresql://`` URL of its ``postgres`` database (trust auth)."""
    with pg_cluster_control() as cluster:
        yield cluster.url


def fresh_database(url: str, name: str) -> str:
    """Create database ``name`` in the cluster at ``url``; its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name
