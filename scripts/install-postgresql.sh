#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for the job-store tests (tests/pgcluster.py starts a throwaway
# cluster with its initdb and pg_ctl; nothing is started here).
#
# Idempotent: does nothing when a PostgreSQL server (initdb) is already installed.
set -euo pipefail
source "$(dirname "$0")/lib/apt-install.sh"

if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "postgresql already installed"
    exit 0
fi

# the Debian package creates and starts a default cluster; the tests never use it
apt_install install-postgresql postgresql
echo "postgresql installed: $(ls -d /usr/lib/postgresql/*/bin)"
