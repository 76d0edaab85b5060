"""What a job store failure means, and how the service lives through one.

A store error is one of three things:

- **unavailable**: the database cannot be reached or answered with a transient error (a PostgreSQL
  failover, a dropped connection, SQLite's "database is locked"). Nothing is wrong with the job: the write
  is retried with backoff, and the lease's fencing token decides afterwards whether it still counts;
- **full**: the disk under the store is full (SQLite's ``SQLITE_FULL``, PostgreSQL's SQLSTATE class 53).
  Retrying does not help until an operator frees space: new jobs are refused (HTTP 507), queued ones are
  held, running ones end with the code ``store_full``;
- anything else is a bug, and is raised as it is.

:class:`StoreHealth` turns a stream of failures and successes into one log line per change of state, so
an outage leaves two lines in the log, not a traceback per poll.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Awaitable, Callable, Literal, TypeVar

from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout

logger = logging.getLogger(__name__)

T = TypeVar("T")

Health = Literal["ok", "unavailable", "full"]

#: Backoff between retries of a store operation: first, factor, cap (seconds).
BACKOFF_FIRST, BACKOFF_FACTOR, BACKOFF_CAP = 0.1, 2.0, 2.0


class StoreError(Exception):
    """The job store could not do what was asked; ``__cause__`` is the driver's error."""


class StoreUnavailable(StoreError):
    """Transient: the store could not be reached, or asked the caller to try again."""


class StoreFull(StoreError):
    """The disk under the store is full: nothing more can be written until space is freed."""


#: PostgreSQL SQLSTATE class 53: insufficient resources (53100 disk_full, 53200 out_of_memory, ...).
_PG_FULL_PREFIX = "53"
#: SQLSTATEs that are the database's weather, whatever the driver's exception class: connection
#: exceptions (08), operator intervention (57: shutting down, starting up, crash recovery), transaction
#: rollbacks a retry resolves (40: serialization failure, deadlock), lock not available (55P03), system
#: errors (58: I/O).
_PG_TRANSIENT_PREFIXES = ("08", "57", "40", "55P03", "58")


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for obj in (orig, getattr(orig, "__cause__", None)):
        for attr in ("sqlstate", "pgcode"):
            code = getattr(obj, attr, None)
            if isinstance(code, str):
                return code
    return None


def classify(exc: BaseException) -> StoreError | None:
    """The store error ``exc`` is, or None when it is not one (a bug, a constraint the code broke)."""
    if isinstance(exc, StoreError):
        return exc
    text = str(exc).lower()
    if "database or disk is full" in text or "no space left on device" in text:
        return StoreFull(f"the job store is full: {_first_line(exc)}")
    state = _sqlstate(exc)
    if state is not None and state.startswith(_PG_FULL_PREFIX):
        return StoreFull(f"the job store is full: {_first_line(exc)}")
    if state is not None and state.startswith(_PG_TRANSIENT_PREFIXES):
        return StoreUnavailable(f"the job store is unavailable: {_first_line(exc)}")
    if isinstance(exc, DBAPIError):
        # integrity and programming errors are the code's fault; the rest (operational, interface,
        # a connection invalidated) are the database's weather
        if exc.connection_invalidated or type(exc).__name__ in ("OperationalError", "InterfaceError", "InternalError"):
            return StoreUnavailable(f"the job store is unavailable: {_first_line(exc)}")
        return None
    if isinstance(exc, (OSError, asyncio.TimeoutError, DisconnectionError, PoolTimeout, ConnectionError)):
        return StoreUnavailable(f"the job store is unavailable: {_first_line(exc)}")
    return None


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc) or type(exc).__name__
    return text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__


def translated(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A store method whose driver errors come out as :class:`StoreUnavailable` or :class:`StoreFull`."""
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified; anything else is raised unchanged
            err = classify(exc)
            if err is None:
                raise
            raise err from exc

    return wrapper


#: Seconds without a failure before a store that failed counts as back: while it comes and goes (reads
#: served, writes refused, as under a locked SQLite) the log keeps one line, not one per flap. Longer
#: than the backoff cap, so a write being retried keeps the state down between its tries.
SETTLE_SECONDS = 2 * BACKOFF_CAP


class StoreHealth:
    """The store's state as this process last saw it; one log line per change, not per failure."""

    def __init__(self, settle: float = SETTLE_SECONDS) -> None:
        self.state: Health = "ok"
        self.since = time.monotonic()
        self.last_failure = -float("inf")
        self.reason = ""
        self.settle = settle

    def failed(self, err: StoreError) -> None:
        state: Health = "full" if isinstance(err, StoreFull) else "unavailable"
        self.last_failure = time.monotonic()
        if state == "unavailable" and self.state == "full":
            return  # full stays full until a probe finds room (an unreachable full store is still full)
        if state != self.state:
            if state == "full":
                logger.error("%s; new jobs are refused (507) and queued ones held until space is freed", err)
            else:
                logger.warning("%s; retrying with backoff", err)
            self.state, self.since, self.reason = state, time.monotonic(), str(err)

    def succeeded(self, room: bool = False) -> None:
        """A store operation worked. A full store is back only when ``room`` (a probe found space); an
        unavailable one once it has not failed for ``settle`` seconds."""
        if self.state == "full" and not room:
            return
        if self.state == "unavailable" and time.monotonic() - self.last_failure < self.settle:
            return
        if self.state != "ok":
            logger.warning("the job store is back after %.1f s (it was %s)", time.monotonic() - self.since, self.state)
            self.state, self.since, self.reason = "ok", time.monotonic(), ""

    @property
    def full(self) -> bool:
        return self.state == "full"


def backoff(attempt: int, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait before retry ``attempt`` (0 first)."""
    return float(min(cap, BACKOFF_FIRST * BACKOFF_FACTOR**attempt))


async def retry_unavailable(op: Callable[[], Awaitable[T]], health: StoreHealth,
                            give_up: Callable[[], bool] = lambda: False) -> T:
    """``op()``, retried with backoff while the store is unavailable (logged once, through ``health``),
    until it answers or ``give_up()`` says the answer no longer matters. :class:`StoreFull` and other
    errors are raised at once."""
    attempt = 0
    while True:
        try:
            result = await op()
        except StoreUnavailable as exc:
            health.failed(exc)
            if give_up():
                raise
            await asyncio.sleep(backoff(attempt))
            attempt += 1
            continue
        except StoreFull as exc:
            health.failed(exc)
            raise
        return result  # the store's own statements tell its health it works (JobStore.__init__)
