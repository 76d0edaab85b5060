"""HTTP connections: a cap on how many are open, and a deadline for a request's headers.

uvicorn has neither (its issue #157). Its keep-alive timeout covers only the idle time after a response
and is reset by every byte received, and nothing times a connection before its first request: a client
that sends its headers a byte at a time, or nothing at all, holds a connection (and, under a cap, a
place) for ever. The body is timed by the app (``service.server.app``'s body guard: a 408 in the API's
error shape); headers arrive before the app is called, so they are timed here, in the protocol.

:func:`guarded_h11` makes a subclass of uvicorn's h11 protocol (used on purpose instead of httptools: the
pure-Python parser is the one uvicorn always installs, and it exposes its state) that

- answers a connection opened beyond ``max_connections`` with 503 ``too_many_connections`` (in the
  API's error shape, ``Connection: close``) as soon as its request head is in, instead of the app;
- gives every request ``header_timeout`` seconds for its head, counted from the connection (the first
  request) or from the first byte of the next one (keep-alive); then 408 ``request_timeout`` and close;
- closes a connection whose request body is still coming ``body_timeout`` seconds after the answer was
  sent: a body nobody reads (an answer given before it, such as a 401) is outside the app's body guard,
  and a client trickling it would otherwise keep the connection for ever (every byte it sends resets
  uvicorn's keep-alive timer).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Callable

import h11
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.server.core.errors import APIError, closing_answer, send_closing_error

logger = logging.getLogger(__name__)


def _request_id() -> list[tuple[bytes, bytes]]:
    return [(b"x-request-id", uuid.uuid4().hex.encode())]  # the app's middleware, which adds it, is not reached


def refusal_app(max_connections: int):
    """The ASGI app a connection over the cap is served by: one 503, then the connection closes."""
    refusal = APIError(503, f"too many open connections (at most {max_connections}); retry shortly",
                       "too_many_connections", headers={"Retry-After": "1"})

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await send_closing_error(send, refusal, _request_id())

    return refuse


def guarded_h11(max_connections: int, header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and request deadlines (see the module docstring); pass
    it as ``uvicorn.Config(http=...)``."""
    refuse = refusal_app(max_connections)
    too_slow = APIError(408, f"the request headers did not arrive within {header_timeout:g} s", "request_timeout")

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _draining = False  # answered, the request body still coming

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                logger.warning("refusing a connection: %d open, at most %d", len(self.connections), max_connections)
                self.app = refuse
            self._arm(header_timeout, self._headers_too_slow)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm(header_timeout, self._headers_too_slow)  # the next request on a kept-alive connection
            super().data_received(data)
            self._follow_request()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow_request()  # a pipelined request may have started

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _follow_request(self) -> None:
            """Move the deadline along with the request: its head (timed here), its body (timed by the app's
            guard), a body still coming after the answer (timed here), done."""
            state = self.conn.their_state
            if state is h11.IDLE:
                if self._draining:  # the unread body is over: the connection waits for its next request
                    self._draining = False
                    self._disarm()
                return
            if state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_complete:
                if not self._draining:
                    self._draining = True
                    self._arm(body_timeout, self._body_too_slow)
                return
            self._draining = False
            self._disarm()

        def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, callback)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            try:
                headers, body = closing_answer(too_slow, _request_id())
                out = self.conn.send(h11.Response(status_code=408, headers=headers, reason=b"Request Timeout")) or b""
                out += self.conn.send(h11.Data(data=body)) or b""
                out += self.conn.send(h11.EndOfMessage()) or b""
                self.transport.write(out)
            except h11.LocalProtocolError:  # pragma: no cover - h11 refused to answer: just close
                pass
            self.transport.close()

        def _body_too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
                logger.warning("closing a connection whose request body did not arrive within %g s", body_timeout)
                self.transport.close()

    return GuardedH11Protocol
