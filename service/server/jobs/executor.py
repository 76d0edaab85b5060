"""Running durable jobs in this process: the job store's executor runs a stored request through its
route's serving class, exactly the streaming path (so a job's events are the route's SSE events and its
answer the route's JSON body), and :class:`Jobs` holds the store, the worker and the webhook sender.

Submitting a job is the generation families' part and lives in the core (``service.server.core.jobs``);
this module is the ``jobs`` family's because only it and the app that opens it use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncGenerator, Awaitable, Callable, cast

from fastapi import Request

from service.jobs import (
    JobFailed,
    JobReporter,
    JobRetry,
    JobRow,
    JobStore,
    JobWorker,
    WebhookSender,
    WorkerConfig,
    open_store,
)
from service.jobs.outage import StoreUnavailable, backoff
from service.server.core.errors import APIError
from service.server.core.jobs import JobSink, decode_spec, job_resource
from service.server.core.runtime import Runtime
from service.server.core.serving_base import ServingBase

logger = logging.getLogger(__name__)

#: Error codes that mean "this replica could not finish it", not "the request is bad": queued again.
RETRYABLE_CODES = frozenset({"engine_unavailable", "shutting_down", "overloaded", "model_loading"})
#: ... of which these do not count as an attempt (the replica was busy or stopping; nothing went wrong).
UNCOUNTED_CODES = frozenset({"shutting_down", "overloaded", "model_loading"})


def _failure(message: str, code: str) -> Exception:
    """What a job's failure with ``code`` means for the worker: back to the queue, or failed."""
    if code in RETRYABLE_CODES:
        return JobRetry(message, count_attempt=code not in UNCOUNTED_CODES, code=code)
    return JobFailed(message, code)


def _error_code(data: str) -> str | None:
    """The ``code`` of an SSE ``error`` event's data (``{"error": {..., "code"}}``), if it has one."""
    try:
        body = json.loads(data)
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) else None

def _no_client_request(endpoint: str) -> Request:
    """A request with no client behind it: what a serving class's ``job`` reads of one (headers) is
    empty, so a stored request runs as the JSON route would run it."""
    return Request({"type": "http", "method": "POST", "path": f"/v1/{endpoint}", "headers": [], "query_string": b""})


class ServingExecutor:
    """The job store's executor: a stored request runs through its route's serving class, exactly the
    streaming path (so its events are the route's SSE events), and its answer is the route's JSON body."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def free_slots(self) -> int:
        if self.rt.state != "ready":
            return 0
        lim = self.rt.limiter
        return max(0, lim.slots - lim.active - lim.waiting)

    def total_slots(self) -> int:
        return int(self.rt.limiter.slots)

    async def run(self, row: JobRow, report: JobReporter) -> bytes:
        assert row.spec is not None, "a claimed job carries its stored request"
        stored = decode_spec(row.spec)
        serving: ServingBase = self.rt.job_servings[stored.endpoint]
        try:
            params = serving.job_params[stored.endpoint].model_validate(stored.params)
            job = await serving.job(stored.endpoint, stored.task, params, stored.images, _no_client_request(stored.endpoint))
            admitted = await serving._admit_all(job)
        except APIError as exc:
            raise _failure(exc.message, exc.code) from None
        report.admitted.set()
        sink = JobSink(report, len(job.inputs))
        events = cast(AsyncGenerator[dict[str, str], None], serving._events(job, admitted, sink))
        async with contextlib.aclosing(events):  # a lost job stops here: its slots and engine pair are freed
            async for sse in events:
                name = sse.get("event", "message")
                if name == "error" and _error_code(sse["data"]) in RETRYABLE_CODES:
                    continue  # the attempt goes back to the queue: followers see `requeued`, not an error
                await report.event(name, sse["data"])
        if sink.error is not None:
            raise _failure(*sink.error)
        response = await serving.render(job, sink.outcomes)
        return bytes(response.body)

    def webhook_body(self, job: JobRow) -> bytes:
        store = self.rt.jobs.store if self.rt.jobs is not None else None
        assert store is not None
        return json.dumps(job_resource(job, store)).encode()


@dataclass
class Jobs:
    """The job store, worker and webhook sender of one process."""

    store: JobStore
    worker: JobWorker
    webhooks: WebhookSender

    @classmethod
    async def open(cls, runtime: Runtime) -> Jobs:
        """Open the store (waiting for it: :func:`open_waiting`) and start the worker; until then the job
        routes answer 503 and ``/ready`` too."""
        s = runtime.settings
        results = Path(s.output_dir) / "jobs" if s.output_dir is not None else None
        store = await open_waiting(lambda: open_store(s.job_store, s.state_dir, results, ttl=s.job_ttl),
                                   s.job_store_wait)
        secret = s.webhook_secret.get_secret_value() if s.webhook_secret is not None else None
        webhooks = WebhookSender(secret, allow_hosts=s.webhook_allow_hosts, allow_private=s.webhook_allow_private)
        config = WorkerConfig(lease=s.job_lease, max_attempts=s.job_max_attempts, reserve_after=s.job_reserve_after)
        config.owner = s.replica_id or socket.gethostname()[:128]
        worker = JobWorker(store, ServingExecutor(runtime), config, webhooks, runtime.metrics)
        jobs = cls(store, worker, webhooks)
        await retry_start(worker, store)
        runtime.jobs = jobs
        runtime.limiter_listeners.append(worker.wake)
        return jobs

    async def close(self) -> None:
        await self.worker.stop()
        await self.webhooks.close()
        await self.store.close()


class StoreWaitExpired(RuntimeError):
    """The job store stayed unreachable for ``--job-store-wait`` seconds at start."""


async def open_waiting(opener: Callable[[], Awaitable[JobStore]], wait: float) -> JobStore:
    """``opener()``, retried with backoff while the store is unreachable, for up to ``wait`` seconds; one
    log line when the wait begins (not a traceback per try), :class:`StoreWaitExpired` when it ends."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            store = await opener()
        except StoreUnavailable as exc:
            waited = time.monotonic() - started
            if attempt == 0:
                logger.warning("%s; waiting up to %.0f s for it (--job-store-wait)", exc, wait)
            if waited >= wait:
                raise StoreWaitExpired(f"{exc}; gave up after waiting {waited:.0f} s (--job-store-wait)") from None
            await asyncio.sleep(min(backoff(attempt, cap=5.0), max(0.0, wait - waited)))
            attempt += 1
            continue
        if attempt:
            logger.warning("the job store is reachable after %.1f s", time.monotonic() - started)
        return store


async def retry_start(worker: JobWorker, store: JobStore) -> None:
    """The worker's start (it requeues this replica's jobs), retried while the store is away again."""
    attempt = 0
    while True:
        try:
            return await worker.start()
        except StoreUnavailable as exc:
            store.health.failed(exc)
            await asyncio.sleep(backoff(attempt, cap=5.0))
            attempt += 1
