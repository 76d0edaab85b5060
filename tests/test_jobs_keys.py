"""Whose job is it (issue 32 item 9) and what the logs never show (item 5): named API keys from a keys
file, each job its submitter's (another key gets 404 on every route, an admin key sees all), jobs counted
per key name, one ``--api-key`` exactly as before; and a server run whose log holds none of the secrets it
was given (the job store's password, the keys, a webhook's token). On SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from service.jobs import NewJob, open_store
from service.jobs.store import schema_version
from service.server.core.auth import KEY, KEY_NAME, ApiKeysError, Caller, load_api_keys
from service.settings import Settings
from tests.pgcluster import fresh_database
from tests.serverproc import metric, running_server, scrape

ALICE, BOB, OPS, SINGLE = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdef", "sk-ops-0123456789abcdef", "single-key"
KEYS_TOML = f"""
[[keys]]
name = "alice"
key = "{ALICE}"

[[keys]]
name = "bob"
key = "{BOB}"

[[keys]]
name = "ops"
key = "{OPS}"
admin = true
"""


def settings(tmp_path: Path, text: str | None = KEYS_TOML, api_key: str | None = None) -> Settings:
    path = None
    if text is not None:
        path = tmp_path / "keys.toml"
        path.write_text(text)
    return Settings(demo=True, api_keys_file=path, api_key=SecretStr(api_key) if api_key else None)


# ---- the keys ------------------------------------------------------------------------------------------
def test_a_keys_file_names_each_key_and_its_role(tmp_path):
    keys = load_api_keys(settings(tmp_path, api_key=SINGLE))
    assert keys.identify(ALICE) == Caller("alice", admin=False)
    assert keys.identify(OPS) == Caller("ops", admin=True)
    assert keys.identify(SINGLE) == Caller("default", admin=True)
    assert keys.identify(ALICE[:-1]) is None and keys.identify(None) is None and keys.identify("") is None


def test_one_key_is_the_single_key_of_before_and_no_key_guards_nothing(tmp_path):
    one = load_api_keys(settings(tmp_path, None, api_key=SINGLE))
    assert one.required and one.names == ["default"] and one.identify(SINGLE) == Caller("default", admin=True)
    assert one.identify("other") is None
    none = load_api_keys(settings(tmp_path, None))
    assert not none.required and none.identify(None) == Caller(None, admin=True)


@pytest.mark.parametrize("text, says", [
    ("[[keys]]\nname = 'a'\nkey = 'short'\n", "keys.0.key"),
    ("[[keys]]\nname = 'a'\nkey = '0123456789abcdef 0'\n", "keys.0.key"),
    ("[[keys]]\nname = 'a b'\nkey = '0123456789abcdef0'\n", "keys.0.name"),
    ("[[keys]]\nname = 'a'\nkey = '0123456789abcdef0'\nrole = 'x'\n", "keys.0.role"),
    ("keys = [", "not TOML"),
    ("", "keys"),
    ("[[keys]]\nname = 'a'\nkey = '0123456789abcdef0'\n[[keys]]\nname = 'a'\nkey = '0123456789abcdef1'\n", "twice"),
    ("[[keys]]\nname = 'a'\nkey = '0123456789abcdef0'\n[[keys]]\nname = 'b'\nkey = '0123456789abcdef0'\n", "share"),
])
def test_a_bad_keys_file_is_refused_naming_the_problem_never_a_key(tmp_path, text, says):
    with pytest.raises(ApiKeysError, match=says) as err:
        load_api_keys(settings(tmp_path, text))
    assert "0123456789abcdef" not in str(err.value)


@pytest.mark.slow
def test_a_missing_keys_file_stops_the_server_with_a_clear_line(tmp_path):
    import subprocess
    import sys

    from tests.serverproc import REPO
    done = subprocess.run([sys.executable, "-m", "service", "serve", "--demo", "--engine", "reference",
                           "--api-keys-file", str(tmp_path / "nope.toml"), "--state-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--api-keys-file" in done.stderr and "cannot be read" in done.stderr


@given(st.from_regex(KEY_NAME, fullmatch=True), st.from_regex(KEY, fullmatch=True))
def test_any_valid_name_and_key_round_trip_through_the_file(name, key):
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        text = f"[[keys]]\nname = {json.dumps(name)}\nkey = {json.dumps(key)}\n"
        keys = load_api_keys(settings(Path(d), text))
    assert keys.identify(key) == Caller(name, admin=False)


# ---- the store -----------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request) -> str | None:
    if request.param == "sqlite":
        return None
    return fresh_database(request.getfixturevalue("pg_cluster"), "k" + uuid.uuid4().hex[:12])


def test_the_store_lists_one_keys_jobs_and_keeps_no_cursor_into_anothers(store_url, tmp_path):
    async def scenario():
        s = await open_store(store_url, tmp_path / "state", tmp_path / "results")
        try:
            a = [(await s.submit(NewJob("t2i", b"{}", submitted_by="alice"), now=float(i))).id for i in range(3)]
            b = (await s.submit(NewJob("t2i", b"{}", submitted_by="bob"), now=5.0)).id
            assert [j.id for j in await s.list_jobs(submitted_by="alice")] == a[::-1]
            assert [j.id for j in await s.list_jobs(submitted_by="bob")] == [b]
            assert len(await s.list_jobs()) == 4
            assert [j.id for j in await s.list_jobs(after=a[2], submitted_by="alice")] == a[1::-1]
            assert await s.list_jobs(after=b, submitted_by="alice") == []  # bob's id is no cursor for alice
            assert (await s.get(b)).submitted_by == "bob"
        finally:
            await s.close()

    asyncio.run(scenario())


def test_a_store_made_before_keys_gets_the_column_and_keeps_its_jobs(store_url, tmp_path):
    """A schema-2 store from before this column (its table made without it) is brought up to date."""
    async def scenario():
        s = await open_store(store_url, tmp_path / "state", tmp_path / "results")
        old = (await s.submit(NewJob("t2i", b"{}"))).id
        async with s.engine.begin() as conn:
            if s.is_postgres:
                await conn.exec_driver_sql("ALTER TABLE emu35_jobs DROP COLUMN submitted_by")
            else:
                await conn.exec_driver_sql("DROP INDEX ix_emu35_jobs_submitted_by")
                await conn.exec_driver_sql("ALTER TABLE emu35_jobs DROP COLUMN submitted_by")
            await conn.execute(schema_version.update().values(version=2))  # as schema 2 wrote it
        await s.close()
        s = await open_store(store_url, tmp_path / "state", tmp_path / "results")
        try:
            assert (await s.get(old)).submitted_by is None
            new = (await s.submit(NewJob("t2i", b"{}", submitted_by="alice"))).id
            assert [j.id for j in await s.list_jobs(submitted_by="alice")] == [new]
        finally:
            await s.close()

    asyncio.run(scenario())


# ---- a server run: ownership over HTTP, and a log without secrets ----------------------------------------
PG_PASSWORD = "Pg-pa55word-in-the-url"
HOOK_TOKEN = "hook-token-in-the-path-42"
SMALL = {"prompt": "a red fox", "size": "128x128", "image_area": 128 * 128}


class _FailingReceiver(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(500)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def keyed_server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    (root / "keys.toml").write_text(KEYS_TOML)
    args = ["--demo", "--engine", "reference", "--max-concurrent", "1", "--api-key", SINGLE,
            "--api-keys-file", str(root / "keys.toml"), "--webhook-allow-hosts", "127.0.0.1:*",
            "--webhook-allow-private", "--replica-id", "keys-test"]
    if request.param == "postgresql":
        url = fresh_database(request.getfixturevalue("pg_cluster"), "s" + uuid.uuid4().hex[:12])
        args += ["--job-store", url.replace("postgresql://postgres@", f"postgresql://postgres:{PG_PASSWORD}@")]
    receiver = HTTPServer(("127.0.0.1", 0), _FailingReceiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with running_server(args, root / "server.log") as proc:
            yield proc, receiver.server_port
    finally:
        receiver.shutdown()
        receiver.server_close()


def client(server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


@pytest.mark.slow
def test_each_key_sees_its_own_jobs_an_admin_all_and_the_log_no_secret(keyed_server):
    server, hook_port = keyed_server
    with client(server, ALICE) as alice, client(server, BOB) as bob, client(server, OPS) as ops, \
            client(server, SINGLE) as single, client(server, None) as anyone:
        r = alice.post("/v1/t2i", json={**SMALL, "webhook": f"http://127.0.0.1:{hook_port}/hooks/{HOOK_TOKEN}"},
                       headers={"Prefer": "respond-async"})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        assert single.post("/v1/t2i", json=SMALL, headers={"Prefer": "respond-async"}).status_code == 202
        deadline = time.monotonic() + 120
        while alice.get(f"/v1/jobs/{job}").json()["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # another key: 404 everywhere, as for a job that does not exist
        for method, path in (("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/events"),
                             ("POST", f"/v1/jobs/{job}/cancel"), ("DELETE", f"/v1/jobs/{job}")):
            r = bob.request(method, path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (method, path, r.text)
        assert bob.get("/v1/jobs").json()["data"] == []
        assert [j["id"] for j in alice.get("/v1/jobs").json()["data"]] == [job]
        assert len(ops.get("/v1/jobs").json()["data"]) == 2 and len(single.get("/v1/jobs").json()["data"]) == 2
        assert ops.get(f"/v1/jobs/{job}").status_code == 200
        assert anyone.get("/v1/jobs").status_code == 401
        m = scrape(ops)
        assert metric(m, "emu35_jobs_submitted_total", key="alice") == 1
        assert metric(m, "emu35_jobs_submitted_total", key="default") == 1
        assert metric(m, "emu35_jobs_submitted_total", key="bob") == 0
        assert alice.delete(f"/v1/jobs/{job}").status_code == 200  # the owner may
        deadline = time.monotonic() + 30
        while "webhook" not in server.log_path.read_text():  # a failed try (HTTP 500) is logged
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
    log = server.log_path.read_text()
    assert '"job_store": ' in log and "webhook msg_" in log
    for secret in (PG_PASSWORD, HOOK_TOKEN, ALICE, BOB, OPS, SINGLE):
        assert secret not in log, secret


@pytest.mark.slow
def test_a_webhook_url_httpx_would_refuse_is_a_400_naming_the_field(keyed_server):
    """These were accepted (202) and then raised out of the delivery, leaving the webhook pending."""
    server, hook_port = keyed_server
    bad = [f"http://127.0.0.1:{hook_port}/a\tb", "http://127.0.0.1:abc/x", "http://127.0.0.1:99999/x",
           "http://xn--zz.example.com/x", "http://127.0.0.1:%d/" % hook_port + "a" * 65 * 1024,
           "http://10.0.0.1/x"]
    with client(server, ALICE) as alice:
        for url in bad:
            r = alice.post("/v1/t2i", json={**SMALL, "webhook": url}, headers={"Prefer": "respond-async"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "webhook", (url[:60], r.text[:300])
        r = alice.post("/v1/t2i", json=SMALL, headers={"Prefer": "respond-async", "Webhook": "http://127.0.0.1:abc/"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "webhook", r.text
