"""What every generation route shares about durable jobs: recognising ``Prefer: respond-async``, storing
a checked request so any replica can run it later, rendering the job resource, and running a stored
request through the same serving class as the synchronous route (the job store's executor).

The store, the worker and the webhooks live below HTTP in :mod:`service.jobs`; the ``/v1/jobs`` routes are
the ``jobs`` family. This module is the core's part because the generation families submit jobs too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncGenerator, Awaitable, Callable, TypeVar, cast

from fastapi import Request

from service.jobs import (
    JobFailed,
    JobReporter,
    JobRetry,
    JobRow,
    JobStore,
    JobWorker,
    NewJob,
    WebhookRefused,
    WebhookSender,
    WorkerConfig,
    check_webhook_url,
    open_store,
)
from service.jobs.outage import StoreError, StoreFull, StoreUnavailable, backoff, retry_unavailable
from service.prompts import Task
from service.server.core.errors import APIError, bad_request
from service.task import Finished, ImageProgress, ImageReady

if TYPE_CHECKING:
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


def prefers_async(request: Request) -> bool:
    """True when a ``Prefer`` header asks for ``respond-async`` (RFC 7240: a list of preferences, each a
    token, optionally ``=value`` and ``;`` parameters; any other preference is ignored)."""
    for header in request.headers.getlist("prefer"):
        for pref in header.split(","):
            token = pref.split(";", 1)[0].split("=", 1)[0].strip().lower()
            if token == "respond-async":
                return True
    return False


def webhook_of(request: Request, params: Any, allow_hosts: list[str]) -> str | None:
    """The job's webhook, from the ``Webhook`` header or the body's ``webhook`` field; 400 when its host
    is not allowed."""
    url = request.headers.get("webhook") or getattr(params, "webhook", None)
    if not url:
        return None
    try:
        return check_webhook_url(url, allow_hosts)
    except WebhookRefused as exc:
        raise bad_request(str(exc), "webhook_not_allowed", "webhook") from None


# ---- the stored request ------------------------------------------------------------------------------
def encode_spec(endpoint: str, task: Task, params: Any, images: list[str | bytes]) -> bytes:
    """The checked request as the store keeps it: enough to rebuild it on any replica."""
    return json.dumps({
        "endpoint": endpoint, "task": task.value, "params": params.model_dump(mode="json"),
        "images": [{"b64": base64.b64encode(x).decode()} if isinstance(x, bytes) else {"text": x} for x in images],
    }).encode()


@dataclass(frozen=True)
class StoredRequest:
    endpoint: str
    task: Task
    params: dict[str, Any]
    images: list[str | bytes]


def decode_spec(spec: bytes) -> StoredRequest:
    d = json.loads(spec)
    images: list[str | bytes] = [base64.b64decode(i["b64"]) if "b64" in i else i["text"] for i in d["images"]]
    return StoredRequest(d["endpoint"], Task(d["task"]), d["params"], images)


# ---- the job resource --------------------------------------------------------------------------------
def job_resource(job: JobRow, store: JobStore, include_result: bool = True) -> dict[str, Any]:
    """``GET /v1/jobs/{id}``: status, route, times, progress; the route's answer once it succeeded, the
    error once it failed."""
    body: dict[str, Any] = {
        "id": job.id, "object": "job", "status": job.status, "route": job.route,
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
        "expires_at": job.expires_at, "attempts": job.attempts, "replica": job.owner,
        "progress": {"images": job.progress.get("images", 0), "rows": job.progress.get("rows", 0)},
        "result": None, "error": job.error, "links": {"self": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"},
    }
    if include_result and job.status == "succeeded":
        raw = store.result(job)
        body["result"] = json.loads(raw) if raw is not None else None
    return body


# ---- running a stored request ------------------------------------------------------------------------
class JobSink:
    """What :meth:`ServingBase._events` tells a job as it runs: progress, each outcome, a failure."""

    def __init__(self, reporter: JobReporter, generations: int) -> None:
        self.reporter = reporter
        self.outcomes: list[Any] = [None] * generations
        self.error: tuple[str, str] | None = None

    def saw(self, index: int, ev: Any) -> None:
        if isinstance(ev, ImageProgress):
            self.reporter.rows_done(ev.rows)
        elif isinstance(ev, ImageReady):
            self.reporter.image_done()
        elif isinstance(ev, Finished):
            self.outcomes[index] = ev.outcome

    def failed(self, message: str, code: str) -> None:
        self.error = (message, code)


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
        webhooks = WebhookSender(secret)
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


#: Seconds a job route waits out a store that went away (a failover, a restart) before answering 503.
STORE_PATIENCE = 10.0

T = TypeVar("T")


async def patiently(store: JobStore, op: Callable[[], Awaitable[T]], within: float = STORE_PATIENCE) -> T:
    """``op()`` on the store, retried with backoff for up to ``within`` seconds while the store is
    unavailable: a client polling a job through a short outage gets its answer, a little late."""
    started = time.monotonic()
    return await retry_unavailable(op, store.health, give_up=lambda: time.monotonic() - started > within)


def store_refusal(store: JobStore) -> APIError | None:
    """Why a new job cannot be stored now: 507 while the store is full (until space is freed)."""
    if store.health.full:
        return APIError(507, f"{store.health.reason}; new jobs are refused until space is freed", "store_full")
    return None


def store_error(exc: StoreError) -> APIError:
    """A store error as the client sees it: 507 for a full disk, else 503 (retry later)."""
    if isinstance(exc, StoreFull):
        return APIError(507, f"{exc}; new jobs are refused until space is freed", "store_full")
    return APIError(503, f"{exc}; retry later", "job_store_unavailable", headers={"Retry-After": "5"})


async def submit_job(serving: ServingBase, endpoint: str, task: Task, params: Any, images: list[str | bytes],
                     request: Request) -> dict[str, Any]:
    """Check the request as the synchronous route would, then store it; the job resource (queued)."""
    rt = serving.rt
    if rt.jobs is None:
        raise APIError(503, "the job store is not open yet", "model_loading", headers={"Retry-After": "5"})
    webhook = webhook_of(request, params, rt.settings.webhook_allow_hosts)
    job = await serving.job(endpoint, task, params, images, request)
    await serving.check_plans(job)
    if len(job.inputs) > rt.limiter.slots:
        raise bad_request(f"this job needs {len(job.inputs)} generation slots; this server has {rt.limiter.slots}",
                          "too_many_generations", "n")
    store: JobStore = rt.jobs.store
    refused = store_refusal(store)
    if refused is not None:
        raise refused
    try:
        new = NewJob(endpoint, encode_spec(endpoint, task, params, images), slots=len(job.inputs), webhook=webhook)
        row = await patiently(store, lambda: store.submit(new))
    except StoreError as exc:
        store.health.failed(exc)
        raise store_error(exc) from None
    rt.jobs.worker.wake()
    return job_resource(row, rt.jobs.store)
