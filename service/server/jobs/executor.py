"""Running durable jobs in this process: the job store's executor runs a stored request through its
route's serving class, exactly the streaming path (so a job's events are the route's SSE events and its
answer the route's JSON body), and :class:`Jobs` holds the store, the worker and the webhook sender.

Submitting a job is the generation families' part and lives in the core (``service.server.core.jobs``);
this module is the ``jobs`` family's because only it and the app that opens it use it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncGenerator, cast

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
from service.server.core.errors import APIError
from service.server.core.jobs import JobSink, decode_spec, job_resource
from service.server.core.runtime import Runtime
from service.server.core.serving_base import ServingBase

#: Error codes that mean "this replica could not finish it", not "the request is bad": queued again.
RETRYABLE_CODES = frozenset({"engine_unavailable", "shutting_down", "overloaded", "model_loading"})
#: ... of which these do not count as an attempt (the replica was busy or stopping; nothing went wrong).
UNCOUNTED_CODES = frozenset({"shutting_down", "overloaded", "model_loading"})


def _failure(message: str, code: str) -> Exception:
    """What a job's failure with ``code`` means for the worker: back to the queue, or failed."""
    if code in RETRYABLE_CODES:
        return JobRetry(message, count_attempt=code not in UNCOUNTED_CODES)
    return JobFailed(message, code)



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

    async def run(self, row: JobRow, report: JobReporter) -> bytes:
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
                await report.event(sse.get("event", "message"), sse["data"])
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
        s = runtime.settings
        results = Path(s.output_dir) / "jobs" if s.output_dir is not None else None
        store = await open_store(s.job_store, s.state_dir, results, ttl=s.job_ttl)
        secret = s.webhook_secret.get_secret_value() if s.webhook_secret is not None else None
        webhooks = WebhookSender(secret, allow_hosts=s.webhook_allow_hosts, allow_private=s.webhook_allow_private)
        config = WorkerConfig(lease=s.job_lease, max_attempts=s.job_max_attempts)
        if s.replica_id:
            config.owner = s.replica_id
        worker = JobWorker(store, ServingExecutor(runtime), config, webhooks, runtime.metrics)
        jobs = cls(store, worker, webhooks)
        runtime.jobs = jobs
        runtime.limiter_listeners.append(worker.wake)
        await worker.start()
        return jobs

    async def close(self) -> None:
        await self.worker.stop()
        await self.webhooks.close()
        await self.store.close()
