"""Webhooks cannot be turned against the server's own network (issue 32 item 4): the whole URL is checked
at submit, the name is resolved at delivery and a non-public address refused, the request goes to the
address that was checked (Host and TLS name kept), only allowed ports are used, and any failure is a
failed try, never a webhook stuck ``pending``. No traffic leaves loopback: resolvers are stand-ins, the
public-address cases go to an ``httpx.MockTransport``, and the one real delivery is to 127.0.0.1."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.jobs import (
    JobWorker,
    NewJob,
    RetryPolicy,
    WebhookRefused,
    WebhookSender,
    WorkerConfig,
    check_webhook_url,
    open_store,
)
from service.jobs.redact import redact_store_url, redact_url
from service.jobs.webhooks import MAX_WEBHOOK_URL, is_public

FAST = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.01, timeout=5)
PUBLIC = "93.184.216.34"


def run(coro):
    return asyncio.run(coro)


# ---- at submit -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "https://hooks.example.com:abc/x",  # a port that is not a number
    "https://hooks.example.com:99999/x",  # a port out of range
    "https://hooks.example.com:0/x",
    "https://hooks.example.com/a\tb",  # a tab (httpx refuses it at send time)
    "https://hooks.example.com/a b",
    "https://hooks.example.com/\n",
    "https://hooks.example.com/" + "a" * (64 * 1024),  # over 64 KiB
    "https://hooks.example.com/" + "a" * MAX_WEBHOOK_URL,
    "https://xn--zz.example.com/x",  # a bad IDNA label
    "https://-bad.example.com/x",
    "https://a..example.com/x",
    "https://hooks.example.com:8443/x",  # a port the pattern does not name
    "https://user:pw@hooks.example.com/x",
    "ftp://hooks.example.com/x",
    "https:///x",
])
def test_urls_httpx_or_the_rules_refuse_are_refused_at_submit(url):
    with pytest.raises(WebhookRefused):
        check_webhook_url(url, ["*.example.com"])


def test_ports_are_80_and_443_unless_the_pattern_names_one():
    assert check_webhook_url("https://hooks.example.com/x", ["*.example.com"])
    assert check_webhook_url("http://hooks.example.com:80/x", ["*.example.com"])
    assert check_webhook_url("https://hooks.example.com:8443/x", ["hooks.example.com:8443"])
    assert check_webhook_url("https://bücher.example.com/x", ["*.example.com"])  # IDNA that encodes
    with pytest.raises(WebhookRefused, match="port 8080"):
        check_webhook_url("https://hooks.example.com:8080/x", ["hooks.example.com:8443"])


_HOSTS = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z][a-z0-9]{0,8}){1,3}", fullmatch=True)


@given(_HOSTS, st.integers(1, 65535), st.integers(1, 65535))
def test_a_pattern_without_a_port_allows_80_and_443_and_one_with_a_port_only_that(host, port, other):
    url = f"https://{host}:{port}/x"
    assert (_allowed(url, [host]) is True) == (port in (80, 443))
    assert _allowed(url, [f"{host}:{port}"]) is True and _allowed(url, [f"{host}:*"]) is True
    assert _allowed(url, [f"{host}:{other}"]) is (other == port)
    assert _allowed(url, [f"x{host}:{port}"]) is False


def _allowed(url: str, patterns: list[str]) -> bool:
    try:
        check_webhook_url(url, patterns)
    except WebhookRefused:
        return False
    return True


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254",
                                  "100.64.0.1", "0.0.0.0", "[::1]", "[fe80::1]", "[::ffff:127.0.0.1]",
                                  "[64:ff9b::a9fe:a9fe]", "224.0.0.1"])
def test_a_non_public_address_literal_is_refused_at_submit_unless_allowed(host):
    url = f"http://{host}/x"
    with pytest.raises(WebhookRefused, match="not a public address"):
        check_webhook_url(url, ["*"])
    assert check_webhook_url(url, ["*"], allow_private=True) == url


@given(st.ip_addresses())
def test_public_means_global_unicast_with_no_private_address_inside(ip):
    if is_public(ip):
        assert ip.is_global and not ip.is_multicast and not ip.is_loopback and not ip.is_private
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            assert is_public(ip.ipv4_mapped)


@given(st.text(max_size=300))
def test_whatever_the_check_accepts_httpx_can_send(text):
    url = "https://hooks.example.com/" + text
    try:
        check_webhook_url(url, ["*.example.com"])
    except WebhookRefused:
        return
    httpx.Request("POST", url)  # raises if httpx would refuse it at send time


# ---- at delivery -----------------------------------------------------------------------------------------
class Resolver:
    """Answers from a script, one answer per call (the last one repeats); records the names asked."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers, self.asked = list(answers), []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def mock_transport(status: int = 204):
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status)

    return httpx.MockTransport(handle), seen


def deliver(url: str, resolver: Resolver, transport: httpx.AsyncBaseTransport | None = None, **kw: Any) -> bool:
    async def go():
        sender = WebhookSender(None, FAST, allow_hosts=kw.pop("allow_hosts", ["*.example.com", "*.test:*"]),
                               resolve=resolver, transport=transport, **kw)
        try:
            return await sender.deliver(url, "msg_1", b"{}")
        finally:
            await sender.close()

    return run(go())


@pytest.mark.parametrize("address", ["127.0.0.1", "169.254.169.254", "10.0.0.7", "::1"])
def test_a_name_resolving_to_a_non_public_address_is_not_called(address):
    resolver, (transport, seen) = Resolver([address]), mock_transport()
    assert deliver("https://hooks.example.com/x", resolver, transport) is False
    assert seen == [] and len(resolver.asked) == FAST.attempts  # resolved again on each try


def test_the_request_goes_to_the_checked_address_with_the_name_in_host_and_tls():
    resolver, (transport, seen) = Resolver([PUBLIC]), mock_transport()
    assert deliver("https://hooks.example.com/x?token=1", resolver, transport) is True
    (req,) = seen
    assert req.url.host == PUBLIC and req.url.path == "/x" and req.url.query == b"token=1"
    assert req.headers["host"] == "hooks.example.com"
    assert req.extensions["sni_hostname"] == "hooks.example.com"


def test_a_name_that_rebinds_to_a_private_address_after_the_first_try_is_not_called_again():
    resolver, (transport, seen) = Resolver([PUBLIC], ["127.0.0.1"]), mock_transport(500)
    assert deliver("https://hooks.example.com/x", resolver, transport) is False
    assert [r.url.host for r in seen] == [PUBLIC]  # the first try only; the rebound ones never connect


def test_of_public_and_private_answers_only_a_public_one_is_used():
    resolver, (transport, seen) = Resolver(["127.0.0.1", PUBLIC]), mock_transport()
    assert deliver("https://hooks.example.com/x", resolver, transport) is True
    assert [r.url.host for r in seen] == [PUBLIC]


@pytest.mark.parametrize("boom", [OSError("resolver down"), UnicodeError("label"), RuntimeError("anything")])
def test_any_exception_during_a_try_is_a_failed_try(boom):
    class Failing(Resolver):
        async def __call__(self, host: str, port: int) -> list[str]:
            raise boom

    assert deliver("https://hooks.example.com/x", Failing([])) is False


class _Receiver(BaseHTTPRequestHandler):
    got: list[str] = []  # the Host header of each request

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["content-length"]))
        type(self).got.append(self.headers["host"])
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_with_allow_private_a_name_resolving_to_loopback_is_delivered_there():
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port
    try:
        url = f"http://hooks.test:{port}/done"
        assert deliver(url, Resolver(["127.0.0.1"])) is False  # refused without the flag
        assert _Receiver.got == []
        assert deliver(url, Resolver(["127.0.0.1"]), allow_private=True) is True
    finally:
        server.shutdown()
        server.server_close()
    assert _Receiver.got == [f"hooks.test:{port}"]


# ---- in the worker: a webhook always ends ----------------------------------------------------------------
class _Executor:
    def free_slots(self) -> int:
        return 0

    def webhook_body(self, job: Any) -> bytes:
        return json.dumps({"id": job.id}).encode()


@pytest.mark.parametrize("url", ["https://hooks.example.com:99999/x", "https://hooks.example.com/a\tb",
                                 "https://xn--zz.example.com/x", "https://hooks.example.com:abc/"])
def test_a_stored_url_that_cannot_be_sent_ends_failed_and_the_job_can_be_purged(tmp_path: Path, url):
    """A URL stored by an older version (or with rules since narrowed) fails its webhook; it was left
    ``pending`` forever, so its job was never purged."""
    async def scenario():
        s = await open_store(None, tmp_path / "state", tmp_path / "results", ttl=0.01)
        sender = WebhookSender(None, FAST, allow_hosts=["*.example.com"], resolve=Resolver([PUBLIC]),
                               transport=mock_transport()[0])
        w = JobWorker(s, _Executor(), WorkerConfig(owner="w"), sender)
        try:
            job = await s.submit(NewJob("t2i", b"{}", webhook=url))
            await s.cancel(job.id)
            w.job_finished(job.id)
            for _ in range(200):
                if (await s.get(job.id)).webhook_state != "pending":
                    break
                await asyncio.sleep(0.01)
            assert (await s.get(job.id)).webhook_state == "failed"
            await asyncio.sleep(0.02)
            assert await s.purge_expired() == 1
        finally:
            await w.stop()
            await sender.close()
            await s.close()

    run(scenario())


# ---- what the logs show ----------------------------------------------------------------------------------
def test_failed_tries_log_the_endpoint_not_the_token(caplog):
    token = "tok_SECRET_in_path_123"
    resolver, (transport, _) = Resolver([PUBLIC]), mock_transport(500)
    with caplog.at_level(logging.WARNING, logger="service.jobs.webhooks"):
        assert deliver(f"https://hooks.example.com/hooks/{token}?sig={token}", resolver, transport) is False
    assert "hooks.example.com" in caplog.text and "HTTP 500" in caplog.text
    assert token not in caplog.text


@pytest.mark.parametrize("url, shown", [
    ("https://hooks.example.com/hooks/T0K?x=1", "https://hooks.example.com/***"),
    ("http://[::1]:8080/", "http://[::1]:8080/"),
    ("https://u:p@h.example.com:99999/x", "***"),
    ("not a url", "***"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_store_url_hides_the_password_and_secret_parameters():
    shown = redact_store_url("postgresql://jobs:Pa55%40w0rd@db.internal:5432/emu?sslpassword=K3y&sslmode=require")
    assert "Pa55" not in shown and "K3y" not in shown
    assert shown.startswith("postgresql://jobs:***@db.internal:5432/emu") and "sslmode=require" in shown
    assert redact_store_url(None) is None and redact_store_url("sqlite:///x.db") == "sqlite:///x.db"
