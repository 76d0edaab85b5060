"""Several generations' event streams as one, for a streamed request with ``n > 1``.

Each stream is pumped by a task of its own, so the images are drawn side by side and their events
interleave as they happen; every item comes out tagged with the index of its stream. Closing the merged
stream (the client went away, or one stream failed) closes every source, which aborts its engine pair.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncGenerator, Sequence, TypeVar

T = TypeVar("T")

_END = object()


async def merge_streams(streams: Sequence[AsyncGenerator[T, None]]) -> AsyncGenerator[tuple[int, T], None]:
    """``(index, item)`` from every stream, in arrival order; the first failure of any stream is raised."""
    if len(streams) == 1:  # the common case needs no tasks
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue(maxsize=len(streams))

    async def pump(index: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async with contextlib.aclosing(stream) as source:
                async for item in source:
                    await queue.put((index, item, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, None, exc))
            return
        await queue.put((index, _END, None))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            index, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                running -= 1
                continue
            yield index, item
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
