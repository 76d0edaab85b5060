#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for the job-store tests (tests/pgcluster.py starts a throwaway
# cluster with its initdb and pg_ctl; nothing is started here).
#
# Idempotent: does nothing when a PostgreSQL server (initdb) is already installed. Same approach as
# scripts/install-browser.sh: the distribution's package works from a local mirror.
set -euo pipefail

if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "postgresql already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-postgresql: no apt-get here; install the PostgreSQL server with your package manager" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        echo "install-postgresql: not root and no sudo; install postgresql as root" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show postgresql >/dev/null 2>&1; then
    $SUDO apt-get update -q
fi
install_packages() {
    # the Debian package creates and starts a default cluster; the tests never use it
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
}
install_packages || { $SUDO apt-get update -q && install_packages; }
echo "postgresql installed: $(ls -d /usr/lib/postgresql/*/bin)"
