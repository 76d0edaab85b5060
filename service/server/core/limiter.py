"""Bounded admission: ``slots`` generations run at once, ``queue`` more may wait, the rest get 429.

A slot is handed straight to the longest waiter when it is released (FIFO, no thundering herd). The
``Retry-After`` a refused client gets is an estimate from how long slots have recently been held.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from typing import Callable


class Overloaded(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the service is at capacity; retry in {retry_after} s")
        self.retry_after = retry_after


class Slot:
    """A held slot; :meth:`release` is idempotent so every exit path may call it."""

    def __init__(self, limiter: "AdmissionLimiter") -> None:
        self._limiter = limiter
        self._since = time.monotonic()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(time.monotonic() - self._since)


class AdmissionLimiter:
    def __init__(self, slots: int, queue: int, on_change: Callable[[int, int], None] | None = None) -> None:
        self.slots = slots
        self.queue = queue
        self._on_change = on_change  # (active, waiting) after every change: keeps gauges exact
        self.active = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._mean_hold = 5.0  # seconds; an exponential moving average of slot hold times

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def capacity(self) -> int:
        return self.slots + self.queue

    def retry_after(self) -> int:
        rounds = (self.waiting + 1) / self.slots
        return max(1, min(300, math.ceil(self._mean_hold * rounds)))

    def check_room(self) -> None:
        """Raise :class:`Overloaded` when a request arriving now could neither run nor queue: checked
        before any upload is decoded, so a full service refuses cheaply."""
        if not (self.active < self.slots and not self._waiters) and len(self._waiters) >= self.queue:
            raise Overloaded(self.retry_after())

    async def acquire(self) -> Slot:
        """A slot now, or after waiting in the queue; :class:`Overloaded` when the queue is full."""
        if self.active < self.slots and not self._waiters:
            self.active += 1
            self._changed()
            return Slot(self)
        if len(self._waiters) >= self.queue:
            raise Overloaded(self.retry_after())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._changed()
        try:
            await fut  # resolved by _release, which hands its slot over (active unchanged)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(None)  # we were handed a slot but will not use it
            else:
                self._waiters.remove(fut)
                self._changed()
            raise
        return Slot(self)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.active, len(self._waiters))

    def _release(self, held: float | None) -> None:
        if held is not None:
            self._mean_hold = 0.8 * self._mean_hold + 0.2 * held
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self._changed()
                return
        self.active -= 1
        self._changed()
