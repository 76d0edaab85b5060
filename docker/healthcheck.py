#!/usr/bin/env python3
"""Container health check: ``emu35-healthcheck [PATH]`` exits 0 when the service answers 200 on PATH.

Docker's ``HEALTHCHECK`` runs it inside the container (``/health`` by default: liveness, no API key).
Python rather than curl because python3 is the one tool every base image is sure to have; proxies are
bypassed so an ``http_proxy`` in the environment cannot send the probe elsewhere.
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_SECONDS = 5.0


def probe(path: str) -> int:
    url = f"http://127.0.0.1:{os.environ.get('EMU35_PORT', '8000')}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_SECONDS) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # URLError, HTTPError (non-2xx), timeouts, refused connections
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1] if len(sys.argv) > 1 else "/health"))
