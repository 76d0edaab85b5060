"""The service answers as its OpenAPI document says: a bounded schemathesis run over a real server.

``serve --demo`` (vLLM where installed, as in CI) with an API key, a 32² px image area and a 192-token
context, so every generation the fuzzer can ask for is a couple of hundred tokens at most (anything
larger does not fit the context: a 400) and the run stays within a couple of minutes on two cores.

Schemathesis runs as its command line (``st run``): its stable interface, and every phase (the
documented examples, boundary "coverage" cases, random fuzzing), with a time budget. Its pytest loader
(``schemathesis.pytest.from_fixture``) does not run on pytest 9.2, and building its tests at
collection time would cost every test run seconds.

Checked on every operation: no 5xx; every status, content type, documented header and JSON body as
the document says; schema-invalid input refused with a 4xx; the API key enforced (schemathesis repeats
a successful call without the key and with a wrong one); and the document loads with every reference
resolved (the reference walk itself is ``tests/test_openapi.py``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serverproc import metric, running_server, scrape

pytest.importorskip("schemathesis")

pytestmark = pytest.mark.slow

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: Generated cases per operation and phase.
MAX_EXAMPLES = 10
#: The whole run's time budget in seconds (schemathesis stops generating when it is spent).
MAX_SECONDS = 100
#: What the run checks; positive_data_acceptance is left out on purpose: a schema-valid request may still
#: be refused with a documented 400 (a size that is no multiple of 16, a context overflow, ...).
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "response_headers_conformance", "negative_data_rejection", "ignored_auth", "unsupported_method")
#: Routes whose documented examples must generate (so the answers' schemas are checked on real answers).
GENERATING = ("t2i", "x2i", "narrative", "guidance", "generate", "images_generations")


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    args = ["--demo", "--api-key", KEY, "--image-area", str(32 * 32), "--max-model-len", "192",
            "--max-concurrent", "4", "--max-queue", "4"]
    with running_server(args, tmp_path_factory.mktemp("fuzz") / "server.log") as proc:
        yield proc


def _schemathesis() -> list[str]:
    """The ``st`` command of this environment."""
    st = Path(sys.executable).with_name("st")
    return [str(st)] if st.exists() else [shutil.which("st") or "st"]


def test_every_operation_answers_as_documented(server, tmp_path):
    started = time.monotonic()
    run = subprocess.run(
        [*_schemathesis(), "run", server.url + "/openapi.json", "--header", f"Authorization: Bearer {KEY}",
         "--checks", ",".join(CHECKS), "--phases", "examples,coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES),
         "--max-time", str(MAX_SECONDS), "--request-timeout", "120", "--no-color", "--warnings", "off"],
        capture_output=True, text=True, timeout=MAX_SECONDS + 240, cwd=tmp_path)  # its cache goes there
    seconds = time.monotonic() - started
    report = run.stdout + run.stderr
    print(report[-3000:], f"\nschemathesis: {seconds:.0f} s")
    assert run.returncode == 0, report[-12000:]
    with httpx.Client(base_url=server.url, headers=AUTH) as http:
        m = scrape(http)
    for endpoint in GENERATING:  # not a vacuous run: real generations were checked on every route
        assert metric(m, "emu35_requests_total", endpoint=endpoint, status="200") >= 1, endpoint
    internal = {k: v for k, v in m.items() if k[0] == "emu35_requests_total" and dict(k[1])["status"] == "500"}
    assert not internal, f"internal errors, probes included: {internal}"


def test_every_secured_operation_refuses_a_missing_or_wrong_key_as_documented(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    secured = [(path, method) for path, item in spec["paths"].items() for method, op in item.items()
               if op.get("security")]
    assert len(secured) >= 10, secured
    for path, method in secured:
        assert "401" in spec["paths"][path][method]["responses"], path
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
            url = server.url + path.replace("{record_id}", "gen-x")
            r = httpx.request(method.upper(), url, headers=headers, json={"prompt": "x"} if method == "post" else None)
            assert r.status_code == 401, (path, headers, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/ready", "/openapi.json", "/docs"):
        assert httpx.get(server.url + path).status_code == 200, path
