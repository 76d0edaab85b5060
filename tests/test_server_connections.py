"""Connections and admission over raw sockets: a client that leaves the queue frees its place; headers or
a body sent byte by byte are cut off within their timeouts; connections beyond the cap are refused; an
idle kept-alive connection is closed.

One server serves the module: the reference engine (quick to start; nothing here depends on the engine),
one generation slot and one queue place, timeouts of 1.5 s, at most 6 connections.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Callable

import httpx
import pytest

from tests.serverproc import metric, running_server, scrape

pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
KEEP_ALIVE = 1.0
MAX_CONNECTIONS = 6
#: Slack on every timing: a deadline may fire this much late on a busy two-core machine.
SLACK = 1.0


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    args = ["--demo", "--engine", "reference", "--max-concurrent", "1", "--max-queue", "1",
            "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
            "--keep-alive-timeout", str(KEEP_ALIVE), "--max-connections", str(MAX_CONNECTIONS)]
    with running_server(args, tmp_path_factory.mktemp("connections") / "server.log", ready_timeout=180) as proc:
        yield proc


@dataclass
class Answer:
    status: int | None  # None: closed without an answer
    head: bytes  # status line and headers, lower-cased
    body: bytes
    seconds: float  # from the start of reading until the connection closed
    closed: bool


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def request_bytes(method: str, path: str, body: dict | None = None, close: bool = False) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + data


def read_until_closed(sock: socket.socket, within: float) -> Answer:
    """Everything the server sends until it closes the connection (or ``within`` seconds pass)."""
    started = time.monotonic()
    data, closed = b"", False
    sock.settimeout(0.1)
    while time.monotonic() - started < within:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    head, _, body = data.partition(b"\r\n\r\n")
    return Answer(status, head.lower(), body, time.monotonic() - started, closed)


def read_one(sock: socket.socket, within: float = 5) -> tuple[int, bytes]:
    """One response (status, body) off a connection that stays open (the body by its Content-Length)."""
    sock.settimeout(within)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ", 2)[1]), body


def trickle(sock: socket.socket, data: bytes, every: float = 0.1) -> float:
    """Send ``data`` a byte at a time until it is sent or the server closes; seconds spent."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.send(bytes([byte]))
        except OSError:
            break
        time.sleep(every)
    return time.monotonic() - started


def wait_for(condition: Callable[[], bool], within: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"not within {within} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def gauge(server, name: str) -> float:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        return metric(scrape(http), name)


# ---- the queue -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_client_that_leaves_the_queue_frees_its_place(server, stream):
    """Slot and queue full: the queued client hangs up, the queue gauge drops at once, and the next
    request is queued instead of refused with 429."""
    holder = connect(server)  # a long generation holds the one slot
    holder.sendall(request_bytes("POST", "/v1/t2i", {"prompt": "hold the slot", "size": "768x768", "stream": True}))
    queued = replacement = None
    try:
        wait_for(lambda: gauge(server, "emu35_requests_in_flight") == 1, 30, "the holder runs")
        disconnects = gauge(server, "emu35_client_disconnects_total")
        queued = connect(server)
        queued.sendall(request_bytes("POST", "/v1/t2i", {"prompt": "wait", "size": "64x64", "stream": stream}))
        wait_for(lambda: gauge(server, "emu35_queue_depth") == 1, 10, "the second request is queued")
        refused = httpx.post(server.url + "/v1/t2i", json={"prompt": "no room", "size": "64x64"}, timeout=10)
        assert refused.status_code == 429  # slot and queue are full

        queued.close()
        freed_in = wait_for(lambda: gauge(server, "emu35_queue_depth") == 0, 2, "the queue place is given back")
        print(f"queue place freed {freed_in:.2f} s after the client left")
        assert gauge(server, "emu35_client_disconnects_total") == disconnects + 1

        replacement = connect(server)
        replacement.sendall(request_bytes("POST", "/v1/t2i", {"prompt": "my turn", "size": "64x64"}))
        wait_for(lambda: gauge(server, "emu35_queue_depth") == 1, 10, "the next request is queued, not refused")
        assert gauge(server, "emu35_requests_in_flight") == 1
    finally:
        for sock in (replacement, queued, holder):
            if sock is not None:
                sock.close()
    wait_for(lambda: gauge(server, "emu35_requests_in_flight") == 0 and gauge(server, "emu35_queue_depth") == 0,
             10, "everything freed once the clients left")


# ---- read timeouts ---------------------------------------------------------------------------------------


def test_an_idle_connection_is_answered_408_and_closed_after_the_header_timeout(server):
    with connect(server) as sock:
        answer = read_until_closed(sock, HEADER_TIMEOUT + 5)
    assert answer.status == 408 and answer.closed
    assert json.loads(answer.body)["error"]["code"] == "request_timeout"
    assert HEADER_TIMEOUT - 0.2 <= answer.seconds <= HEADER_TIMEOUT + SLACK


def test_headers_sent_byte_by_byte_are_cut_off_after_the_header_timeout(server):
    head = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 100 + b"\r\n\r\n"  # 13 s at 10 bytes/s
    with connect(server) as sock:
        started = time.monotonic()
        trickle(sock, head)
        answer = read_until_closed(sock, 5)
        seconds = time.monotonic() - started
    assert answer.status == 408 and answer.closed, answer
    assert json.loads(answer.body)["error"]["code"] == "request_timeout"
    assert seconds <= HEADER_TIMEOUT + SLACK


def test_a_body_sent_byte_by_byte_is_cut_off_with_408_after_the_body_timeout(server):
    body = json.dumps({"prompt": "x" * 100}).encode()  # 11 s at 10 bytes/s
    head = (f"POST /v1/t2i HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with connect(server) as sock:
        sock.sendall(head)
        started = time.monotonic()
        trickle(sock, body)
        answer = read_until_closed(sock, 5)
        seconds = time.monotonic() - started
    assert answer.status == 408 and answer.closed, answer
    error = json.loads(answer.body)["error"]
    assert error["code"] == "request_timeout" and "body" in error["message"]
    assert seconds <= BODY_TIMEOUT + SLACK


def test_a_slow_but_steady_upload_gets_through(server):
    """A body arriving faster than 64 KiB/s earns time beyond the body timeout: 300 kB over about 2.5 s
    (longer than the timeout) is read and answered (a 400 for its size field, not a 408)."""
    body = b'{"prompt": "x", "size": "bad"}' + b" " * 300_000
    head = (f"POST /v1/t2i HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with connect(server) as sock:
        sock.sendall(head)
        started = time.monotonic()
        for at in range(0, len(body), 30_000):
            sock.sendall(body[at:at + 30_000])
            time.sleep(0.25)
        spent = time.monotonic() - started
        answer = read_until_closed(sock, 5)
    assert spent > BODY_TIMEOUT
    assert answer.status == 400, answer
    assert json.loads(answer.body)["error"]["param"] == "size"


def test_a_kept_alive_connection_times_each_request_on_its_own(server):
    """The header deadline starts again with each request: requests spaced by less than the keep-alive
    timeout on one connection, longer together than the header timeout, are all answered."""
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(request_bytes("GET", "/health"))
            assert read_one(sock) == (200, b'{"status":"ok"}')
            time.sleep(0.8)  # three requests span more than the header timeout, each within it


def test_a_body_nobody_reads_cannot_hold_the_connection(server):
    """An answer given before the body is read (here 415) leaves the body unread; a client trickling it
    is still cut off shortly after the body timeout (each byte would reset uvicorn's keep-alive timer)."""
    head = (b"POST /v1/images/edits HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    with connect(server) as sock:
        sock.sendall(head)
        started = time.monotonic()
        spent = trickle(sock, b" " * 1000)  # stops when the server closes
        answer = read_until_closed(sock, 5)
    assert answer.status == 415
    assert spent <= BODY_TIMEOUT + 1 + SLACK, f"the connection stayed open {spent:.1f} s"
    assert time.monotonic() - started <= BODY_TIMEOUT + 1 + 2 * SLACK


def test_an_idle_kept_alive_connection_closes_after_the_keep_alive_timeout(server):
    with connect(server) as sock:
        sock.sendall(request_bytes("GET", "/health"))
        answer = read_until_closed(sock, KEEP_ALIVE + 5)
    assert answer.status == 200 and answer.closed
    assert answer.seconds <= KEEP_ALIVE + SLACK


# ---- the connection cap ----------------------------------------------------------------------------------


def test_connections_beyond_the_cap_are_refused_with_503_and_closed(server):
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        with connect(server) as extra:
            extra.sendall(request_bytes("GET", "/health"))
            answer = read_until_closed(extra, 5)
        assert answer.status == 503 and answer.closed, answer
        assert json.loads(answer.body)["error"]["code"] == "too_many_connections"
        assert b"retry-after: 1" in answer.head
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    with connect(server) as sock:  # room again once they are gone
        sock.sendall(request_bytes("GET", "/health", close=True))
        assert read_until_closed(sock, 5).status == 200
