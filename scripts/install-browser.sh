#!/usr/bin/env bash
# Installs Debian's chromium for the playground's browser test (tests/test_playground.py).
#
# Idempotent: does nothing when `chromium` is already on PATH. Uses the distribution's package on
# purpose: Playwright's own browser downloads need the internet at test time and a matching
# Playwright version, while apt works from a local mirror on a cluster.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get here; install chromium with your package manager" >&2
    exit 1
fi

# Root runs apt-get directly; anyone else needs sudo.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        echo "install-browser: not root and no sudo; install chromium as root" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive

# Refresh the package lists only when apt does not know the package yet (a fresh image has none).
if ! apt-cache show chromium >/dev/null 2>&1; then
    $SUDO apt-get update -q
fi

# fonts-dejavu-core: chromium depends on no font, and without one the page's text renders as boxes
install_packages() {
    $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
}
# stale package lists name versions the mirror no longer has: refresh once and retry
install_packages || { $SUDO apt-get update -q && install_packages; }
echo "chromium installed: $(command -v chromium)"
