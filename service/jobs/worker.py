"""The job worker: claims queued jobs when this replica has free slots, runs them under a renewed lease,
stores their events and results, and sends their webhooks.

How a job is run is the HTTP layer's business (it is the same serving path as the synchronous routes);
it hands the worker a :class:`JobExecutor`. Metrics go through :class:`JobMetrics` for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from service.jobs.outage import StoreError, StoreFull, backoff, retry_unavailable
from service.jobs.store import JobEvent, JobRow, JobStore, requeued_event_data
from service.jobs.webhooks import WebhookSender

logger = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job that cannot succeed (the request is invalid for the engine, say): failed, not retried."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class JobRetry(Exception):
    """This replica could not finish the job: queued again. The attempt counts towards ``max_attempts``
    when ``count_attempt`` (the engine died under it), not when the replica was only busy or stopping."""

    def __init__(self, message: str, count_attempt: bool = True, code: str = "engine_unavailable") -> None:
        super().__init__(message)
        self.count_attempt, self.code = count_attempt, code


class JobLost(Exception):
    """This replica no longer holds the job (it was canceled, or its lease was taken over)."""


#: Seconds a job's events may wait to be written together. An event that comes at least this long after
#: the last write is written at once (a real model's image rows do), denser ones (text tokens, a tiny
#: model's rows) are written together: at most a few transactions a second per job, whatever the token
#: rate, for at most this much delay to the job's followers (Replicate throttles its prediction updates
#: the same way).
EVENT_WRITE_EVERY = 0.25


class JobReporter:
    """What a running job tells the store: its events (with sequence ids) and its progress, each write
    made with the claim's fencing ``token``. Raises :class:`JobLost` once the job is no longer this
    claim's, which stops the run.

    Events are written in order, at once or, when they come faster than ``write_every``, a few together
    (a timer writes what waits); :meth:`flush` writes what is left before the job's result. While the
    store is unavailable a write is retried with backoff (the run waits, its events kept in order); the
    token decides afterwards whether the job is still this claim's."""

    def __init__(self, store: JobStore, job_id: str, token: str, first_seq: int,
                 write_every: float = EVENT_WRITE_EVERY) -> None:
        self.store, self.job_id, self.token = store, job_id, token
        self.seq = first_seq
        self.write_every = write_every
        self.progress: dict[str, int] = {"images": 0, "rows": 0}
        self.admitted = asyncio.Event()  # set once the job holds its admission slots
        self.finishing = False  # its result or failure is being written: never cancel it then
        self._waiting: list[JobEvent] = []
        self._last_write = -float("inf")
        self._writing = asyncio.Lock()  # one write at a time keeps the events in order
        self._timer: asyncio.Task | None = None
        self._lost = False

    async def event(self, name: str, data: str) -> None:
        if self._lost:
            raise JobLost(self.job_id)
        self._waiting.append(JobEvent(self.seq, name, data))
        self.seq += 1
        wait = self._last_write + self.write_every - time.monotonic()
        if wait <= 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_after(wait), name=f"emu35-job-events-{self.job_id}")

    async def _flush_after(self, wait: float) -> None:
        await asyncio.sleep(wait)
        self._timer = None
        try:
            await self.flush()
        except (JobLost, StoreError):  # the run's next event raises it; the lease renewal stops it meanwhile
            pass
        except Exception:  # noqa: BLE001 - not a store error: the events wait for the next write
            logger.warning("writing the events of job %s failed; retrying with the next ones", self.job_id,
                           exc_info=True)

    async def flush(self) -> None:
        """Write the events that wait (and the progress)."""
        async with self._writing:
            if not self._waiting:
                return
            events, self._waiting = self._waiting, []
            self._last_write = time.monotonic()
            try:
                held = await retry_unavailable(
                    lambda: self.store.add_events(self.job_id, self.token, events, self.progress), self.store.health)
            except BaseException:
                self._waiting[:0] = events  # not written: they go with the next write, still in order
                raise
            self._lost = self._lost or not held
        if self._lost:
            raise JobLost(self.job_id)

    async def settle(self) -> None:
        """The run ended without a result (it failed, or goes back to the queue): write what it streamed
        while the job is still this replica's; a rerun numbers its events after them."""
        with contextlib.suppress(JobLost, StoreFull):
            await self.flush()

    def close(self) -> None:
        """The run ended: what still waits is dropped (only a finished job's events matter, and those
        were flushed; a rerun numbers its events after the last one written)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def rows_done(self, rows: int) -> None:
        self.progress["rows"] = rows

    def image_done(self) -> None:
        self.progress["images"] += 1


class JobExecutor(Protocol):
    """How the HTTP layer runs a stored request and renders a job."""

    def free_slots(self) -> int:
        """Admission slots this replica could give a job now."""
        ...

    def total_slots(self) -> int:
        """Admission slots this replica has in all (the most one job can get here)."""
        ...

    async def run(self, job: JobRow, report: JobReporter) -> bytes:
        """Run the job's request to its answer (the synchronous route's JSON body). Raise
        :class:`JobFailed` for a request that cannot succeed."""
        ...

    def webhook_body(self, job: JobRow) -> bytes:
        """The job as its webhook sends it."""
        ...


class JobMetrics(Protocol):
    def lease_expired(self, n: int) -> None: ...

    def job_requeued(self) -> None: ...

    def jobs_counted(self, counts: dict[str, int], oldest_queued_age: float) -> None: ...


@dataclass
class WorkerConfig:
    owner: str = field(default_factory=socket.gethostname)  # a replica's name; stable across its restarts
    lease: float = 30.0  # seconds a claim holds without renewal
    poll: float = 0.5  # seconds between claims when idle
    max_attempts: int = 3  # claims before a job whose replica keeps dying is failed
    housekeeping: float | None = None  # seconds between lease renewals and expiry sweeps (default lease/3)
    event_write_every: float = EVENT_WRITE_EVERY  # seconds events may wait to be written together
    reserve_after: float | None = 60.0  # seconds the oldest queued job waits before slots are held for it
    purge_every: float = 60.0  # seconds between purges of expired jobs and sweeps of orphaned files
    orphan_age: float = 3600.0  # seconds a result or temporary file no job references is kept
    full_probe: float = 5.0  # seconds between checks that a full store has room again


@dataclass
class _Running:
    job: JobRow
    task: asyncio.Task
    reporter: JobReporter


class JobWorker:
    def __init__(self, store: JobStore, executor: JobExecutor, config: WorkerConfig,
                 webhooks: WebhookSender | None = None, metrics: JobMetrics | None = None) -> None:
        self.store, self.executor, self.config = store, executor, config
        self.webhooks, self.metrics = webhooks, metrics
        self.running: dict[str, _Running] = {}
        self._tasks: list[asyncio.Task] = []
        self._deliveries: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_probe = -float("inf")  # when a full store was last probed for room

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Queue again what this replica ran when it stopped, then claim and keep house."""
        requeued, failed = await self.store.requeue_owned(self.config.owner, self.config.max_attempts)
        if requeued or failed:
            logger.warning("restart: %d job(s) of %s queued again, %d failed after too many attempts",
                           len(requeued), self.config.owner, len(failed))
        for job_id in failed:
            self.job_finished(job_id)
        for job in await self.store.pending_webhooks():
            self._deliver_later(job)
        self._tasks = [asyncio.create_task(self._claim_loop(), name="emu35-job-claims"),
                       asyncio.create_task(self._housekeeping_loop(), name="emu35-job-leases"),
                       asyncio.create_task(self._purge_loop(), name="emu35-job-purge")]

    def wake(self) -> None:
        """A job was submitted or a slot freed: claim now instead of at the next poll."""
        self._wake.set()

    def pause(self) -> None:
        """Claim nothing more (a drain began); running jobs go on, their leases renewed."""
        self._stopping = True

    async def stop(self) -> None:
        """Stop claiming; jobs still running are given back to the queue (another replica, or this one
        after its restart, runs them)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in list(self.running.values()):
            r.task.cancel()
        await asyncio.gather(*(r.task for r in list(self.running.values())), return_exceptions=True)
        for d in list(self._deliveries):
            d.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)

    # ---- claiming --------------------------------------------------------------------------------
    def free_slots(self) -> int:
        """Slots free for new jobs: the executor's, less those of jobs claimed but not yet admitted."""
        pending = sum(r.job.slots for r in self.running.values() if not r.reporter.admitted.is_set())
        return self.executor.free_slots() - pending

    async def claim_once(self) -> list[JobRow]:
        if self._stopping or self.store.health.full:  # a full store: queued jobs are held, not failed
            return []
        claimed = await self.store.claim(self.config.owner, self.free_slots(), self.config.lease,
                                         total_slots=self.executor.total_slots(),
                                         reserve_after=self.config.reserve_after)
        for job in claimed:
            await self._launch(job)
        return claimed

    async def _launch(self, job: JobRow) -> None:
        """Run a claimed job. If this process still runs an older claim of it (its lease expired while the
        store was away, and it was claimed again here), that run is stopped first: one process never runs
        two copies of a job, and the old one could not write anyway."""
        assert job.claim_token is not None
        stale = self.running.get(job.id)
        reporter = JobReporter(self.store, job.id, job.claim_token, await self.store.next_seq(job.id),
                               self.config.event_write_every)
        task = asyncio.create_task(self._run(job, reporter, stale.task if stale is not None else None),
                                   name=f"emu35-job-{job.id}")
        self.running[job.id] = _Running(job, task, reporter)
        if stale is not None:
            logger.warning("job %s was claimed again while an older run of it lives here: stopping that run", job.id)
            stale.task.cancel()

    async def _claim_loop(self) -> None:
        failures = 0
        while True:
            try:
                await self.claim_once()
                failures = 0
            except StoreError as exc:  # one log line per change of state (StoreHealth), not per poll
                self.store.health.failed(exc)
                await asyncio.sleep(backoff(failures))
                failures += 1
                continue
            except Exception:  # noqa: BLE001 - a bug must not end the loop
                logger.exception("claiming jobs failed; retrying")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll)

    # ---- running -----------------------------------------------------------------------------------
    async def _persist(self, op: Callable[[], Awaitable[bool]]) -> bool:
        """A write that ends a run, retried while the store is unavailable (the result is kept in memory
        meanwhile; the claim token decides afterwards whether it still counts) and shielded from a cancel
        once started."""
        return await asyncio.shield(retry_unavailable(op, self.store.health))

    async def _run(self, job: JobRow, reporter: JobReporter, after: asyncio.Task | None = None) -> None:
        if after is not None:  # an older run of this job in this process: let it stop first
            with contextlib.suppress(BaseException):
                await after
        try:
            try:
                done = await self._attempt(job, reporter)
            except StoreFull as exc:  # from the run's writes, or from writing how it ended
                await self._hold_on_full(job, reporter, exc)
                done = False
        finally:
            reporter.close()
            mine = self.running.get(job.id)
            if mine is not None and mine.reporter is reporter:  # not a newer claim's entry
                del self.running[job.id]
            self.wake()
        if done:
            self.job_finished(job.id)

    async def _attempt(self, job: JobRow, reporter: JobReporter) -> bool:
        """Run the job and store how it ended; True when it ended here (succeeded or failed)."""
        token = reporter.token
        try:
            body = await self.executor.run(job, reporter)
            await reporter.flush()  # every event is stored before the job is marked done
            reporter.finishing = True  # shielded: a cancel now must not cut the completing transaction
            return await self._persist(lambda: self.store.complete(job.id, token, body))
        except JobFailed as exc:
            await reporter.settle()
            reporter.finishing = True
            message, code = exc.message, exc.code
            return await self._persist(lambda: self.store.fail(job.id, token, message, code))
        except JobLost:
            return False
        except JobRetry as exc:
            logger.warning("job %s goes back to the queue: %s", job.id, exc)
            await reporter.settle()
            requeued = requeued_event_data(str(exc), exc.code, job.attempts)
            counted = exc.count_attempt
            if await self._persist(lambda: self.store.release(job.id, token, counted, requeued)):
                if self.metrics is not None:
                    self.metrics.job_requeued()
            return False
        except StoreFull:
            raise
        except asyncio.CancelledError:
            if self._stopping:  # give it back now rather than when its lease runs out
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.release(job.id, token))
            raise
        except Exception:  # noqa: BLE001 - recorded on the job; the log has the traceback
            logger.exception("job %s failed", job.id)
            await reporter.settle()
            return await self._persist(
                lambda: self.store.fail(job.id, token, f"the generation failed (job {job.id})", "generation_failed"))

    async def _hold_on_full(self, job: JobRow, reporter: JobReporter, exc: StoreFull) -> None:
        """The store is full: the run stops (its slots are freed) and the job is held, given back to the
        queue with a ``requeued`` event of code ``store_full``, its attempt not counted. Claims pause
        while the store is full, so it runs again once space is freed. The release itself is retried
        until it can be written (the job stays this replica's, its lease renewed, meanwhile)."""
        reporter.finishing = True
        data = requeued_event_data(f"{exc}; the job waits in the queue until space is freed", "store_full",
                                   job.attempts)
        attempt = 0
        while True:
            try:
                await asyncio.shield(self.store.release(job.id, reporter.token, False, data))
                return
            except StoreError as err:
                self.store.health.failed(err)
                await asyncio.sleep(backoff(attempt, cap=5.0))
                attempt += 1

    def cancel_local(self, job_id: str) -> bool:
        """Stop a job this replica runs (it was canceled): the run is cancelled, which aborts its engine
        pair and frees its slots at once."""
        r = self.running.get(job_id)
        if r is None:
            return False
        r.task.cancel()
        return True

    # ---- webhooks --------------------------------------------------------------------------------
    def job_finished(self, job_id: str) -> None:
        """A job ended (here, or canceled by a client): send its webhook if it has one."""
        async def load_and_deliver() -> None:
            job = await self.store.get(job_id)
            if job is not None and job.webhook_state == "pending":
                await self._deliver(job)

        self._track(asyncio.create_task(load_and_deliver()))

    def _deliver_later(self, job: JobRow) -> None:
        self._track(asyncio.create_task(self._deliver(job)))

    def _track(self, task: asyncio.Task) -> None:
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, job: JobRow) -> None:
        if self.webhooks is None or job.webhook is None:
            return
        try:
            ok = await self.webhooks.deliver(job.webhook, f"msg_{job.id}", self.executor.webhook_body(job))
        except Exception:  # noqa: BLE001 - a webhook left pending would keep its job from being purged
            logger.exception("webhook of job %s could not be sent", job.id)
            ok = False
        await retry_unavailable(lambda: self.store.set_webhook_state(job.id, "delivered" if ok else "failed"),
                                self.store.health)

    # ---- leases, expiry, metrics -------------------------------------------------------------------
    async def housekeeping_once(self) -> None:
        cfg = self.config
        asked = dict(self.running)  # jobs launched while the renewal runs were not asked about
        held = await self.store.renew([r.reporter.token for r in asked.values()], cfg.lease)
        for job_id, r in asked.items():
            # a job finishing now is no longer "running" in the store, but it is not lost either
            if r.reporter.token not in held and not r.task.done() and not r.reporter.finishing:
                logger.warning("job %s is no longer held by %s (canceled or taken over): stopping it", job_id, cfg.owner)
                r.task.cancel()
        requeued, failed = await self.store.expire_leases(cfg.max_attempts)
        if requeued or failed:
            logger.warning("leases expired: %d job(s) queued again, %d failed", len(requeued), len(failed))
            if self.metrics is not None:
                self.metrics.lease_expired(len(requeued) + len(failed))
            for job_id in failed:
                self.job_finished(job_id)
            self.wake()
        if self.metrics is not None:
            age = await self.store.oldest_queued_age()
            self.metrics.jobs_counted(await self.store.counts(), max(0.0, age or 0.0))

    async def _housekeeping_loop(self) -> None:
        every = self.config.housekeeping or self.config.lease / 3
        while True:
            try:
                await self.housekeeping_once()
            except StoreError as exc:  # logged once per change of state
                self.store.health.failed(exc)
            except Exception:  # noqa: BLE001 - a bug must not end the loop
                logger.exception("job housekeeping failed; retrying")
            if self.store.health.full:
                await self._probe_room()
            await asyncio.sleep(every)

    async def _probe_room(self) -> None:
        """While the store is full: has space been freed? Then claims resume."""
        if time.monotonic() - self._last_probe < self.config.full_probe:
            return
        self._last_probe = time.monotonic()
        try:
            await self.store.probe_room()
        except StoreError:
            return
        self.store.health.succeeded(room=True)
        self.wake()

    async def purge_once(self) -> tuple[int, int]:
        """Expired jobs purged, orphaned files swept."""
        purged = await self.store.purge_expired()
        swept = await self.store.sweep_files(self.config.orphan_age)
        return purged, swept

    async def _purge_loop(self) -> None:
        """Purging in its own task: a slow purge after a long outage never delays a lease renewal."""
        while True:
            try:
                await self.purge_once()
            except StoreError as exc:
                self.store.health.failed(exc)
            except Exception:  # noqa: BLE001 - a bug must not end the loop
                logger.exception("purging expired jobs failed; retrying")
            await asyncio.sleep(self.config.purge_every)
