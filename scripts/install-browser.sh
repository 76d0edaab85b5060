#!/usr/bin/env bash
# Installs Debian's chromium for the playground's browser test (tests/test_playground.py).
#
# Idempotent: does nothing when `chromium` is already on PATH. Debian's package rather than
# Playwright's own browser download, which needs the internet at test time and a matching Playwright.
set -euo pipefail
source "$(dirname "$0")/lib/apt-install.sh"

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium)"
    exit 0
fi

# fonts-dejavu-core: chromium depends on no font, and without one the page's text renders as boxes
apt_install install-browser chromium fonts-dejavu-core
echo "chromium installed: $(command -v chromium)"
