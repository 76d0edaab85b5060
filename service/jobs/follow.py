"""Following a job's events: what a client missed (after its ``Last-Event-ID``), then the live ones,
until the job ends. It works on any replica, whichever one runs the job: what this process commits is
handed over in memory; anything else (another replica's writes, a gap) is read from the store, and only
the events after the last one the follower has, with the job's status (never the stored request).

A store outage does not end the stream: reads are retried with backoff until the store answers."""

from __future__ import annotations

from typing import AsyncIterator

from service.jobs.outage import retry_unavailable
from service.jobs.store import JobEvent, JobStore

#: Seconds between reads of a running job's new events when no write in this process comes first (the
#: job runs on another replica).
POLL_SECONDS = 0.5


async def follow_events(store: JobStore, job_id: str, after: int = 0,
                        poll: float = POLL_SECONDS) -> AsyncIterator[JobEvent]:
    """Every event of ``job_id`` with a sequence id above ``after``, each once, in order; ends when
    the job has ended (or is gone) and every event is out."""
    watch = store.watch(job_id)  # before the first read: nothing committed after it is missed
    try:
        read_store = True
        while True:
            if read_store:
                # the status before the events: nothing written after it is missed
                status = await retry_unavailable(lambda: store.status(job_id), store.health)
                for ev in await retry_unavailable(lambda last=after: store.events(job_id, last),  # type: ignore[misc]
                                                  store.health):
                    after = ev.seq
                    yield ev
                if status is None or status in ("succeeded", "failed", "canceled"):
                    return
            change = await watch.next(poll)
            if change is None:  # nothing from this process: the job may run elsewhere
                read_store = True
                continue
            events, finished = change
            fresh = [ev for ev in events if ev.seq > after]
            # a gap (events another process wrote) or the job's end: the store has the whole story
            read_store = finished or (bool(fresh) and fresh[0].seq != after + 1)
            if not read_store:
                for ev in fresh:
                    after = ev.seq
                    yield ev
    finally:
        store.unwatch(job_id, watch)
