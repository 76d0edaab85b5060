"""Token deltas from an engine's worker thread to the coroutine that awaits them.

The reference and FlashAR engines decode in a thread of their own. Each request gets a channel: the
thread puts deltas (or the exception that stopped it) and closes it; the request's async generator reads
it to the end. Both engines need the same rules at that border, so they live here once:

- an exception from the thread surfaces as :class:`EngineError`;
- a stream that ends without a finished delta ends with an ``abort`` delta, as vLLM's would;
- a reader that leaves early aborts the request in the engine, so the thread stops working for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncGenerator, Awaitable, Callable

from service.engine.protocol import EngineError
from service.types import TokenDelta

_CLOSED = object()


class DeltaChannel:
    """One request's deltas, put by the engine thread, read in the event loop that created the channel."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    # ---- the engine thread's side ----------------------------------------------------------------
    def put(self, item: TokenDelta | BaseException) -> None:
        self._send(item)

    def close(self) -> None:
        """Nothing more will come."""
        self._send(_CLOSED)

    def _send(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed already: nobody is left to read
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    # ---- the event loop's side -------------------------------------------------------------------
    async def deltas(self, engine: str, abort: Callable[[], Awaitable[None]]) -> AsyncGenerator[TokenDelta, None]:
        """The deltas up to the finished one; ``engine`` names the engine in an error, ``abort`` stops the
        request when the reader leaves before the end."""
        finished = False
        try:
            while True:
                item = await self._queue.get()
                if item is _CLOSED:
                    break
                if isinstance(item, BaseException):
                    raise EngineError(f"{engine} failed: {item}") from item
                finished = finished or item.finished
                yield item
                if item.finished:
                    break
            if not finished:
                yield TokenDelta([], "abort")
        finally:
            if not finished:
                await abort()
