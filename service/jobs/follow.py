"""Following a job's events: what a client missed (after its ``Last-Event-ID``), then the live ones,
until the job ends. Read from the store, so it works on any replica, whichever one runs the job."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from service.jobs.store import JobEvent, JobStore

#: Seconds between reads of a running job's new events when no write in this process wakes the follower
#: first (the job runs on another replica).
POLL_SECONDS = 0.5


async def follow_events(store: JobStore, job_id: str, after: int = 0,
                        poll: float = POLL_SECONDS) -> AsyncIterator[JobEvent]:
    """Every event of ``job_id`` with a sequence id above ``after``, each once, in order; ends when
    the job has ended (or is gone) and every event is out."""
    woken = store.watch(job_id)
    try:
        while True:
            woken.clear()
            job = await store.get(job_id)  # read before the events: nothing written after it is missed
            for ev in await store.events(job_id, after):
                after = ev.seq
                yield ev
            if job is None or job.finished:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(woken.wait(), poll)
    finally:
        store.unwatch(job_id, woken)
