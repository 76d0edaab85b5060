"""What every generation route shares about durable jobs: recognising ``Prefer: respond-async``, storing
a checked request so any replica can run it later, rendering the job resource, and what a running job
hears of its events (:class:`JobSink`).

The store, the worker and the webhooks live below HTTP in :mod:`service.jobs`; the ``/v1/jobs`` routes,
the store's executor (a stored request run through its route's serving class) and the process's
:class:`~service.server.jobs.executor.Jobs` are the ``jobs`` family. This module is the core's part because
the generation families submit jobs too; it knows no serving class, so the serving template can import it.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from fastapi import Request

from service.jobs import (
    JobReporter,
    JobRow,
    JobStore,
    NewJob,
    WebhookRefused,
    check_webhook_url,
)
from service.jobs.outage import StoreError, StoreFull, retry_unavailable
from service.prompts import Task
from service.server.core.auth import ANONYMOUS, Caller
from service.server.core.errors import APIError, bad_request
from service.task import Finished, ImageProgress, ImageReady

if TYPE_CHECKING:
    from service.server.core.runtime import Runtime
    from service.settings import Settings

logger = logging.getLogger(__name__)


def prefers_async(request: Request) -> bool:
    """True when a ``Prefer`` header asks for ``respond-async`` (RFC 7240: a list of preferences, each a
    token, optionally ``=value`` and ``;`` parameters; any other preference is ignored)."""
    for header in request.headers.getlist("prefer"):
        for pref in header.split(","):
            token = pref.split(";", 1)[0].split("=", 1)[0].strip().lower()
            if token == "respond-async":
                return True
    return False


def webhook_of(request: Request, params: Any, settings: Settings) -> str | None:
    """The job's webhook, from the ``Webhook`` header or the body's ``webhook`` field; 400 naming the field
    when the URL is malformed or its host, port or address is not allowed."""
    url = request.headers.get("webhook") or getattr(params, "webhook", None)
    if not url:
        return None
    try:
        return check_webhook_url(url, settings.webhook_allow_hosts, settings.webhook_allow_private)
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


def accept_job(runtime: Runtime, request: Request, params: Any) -> str | None:
    """What a job needs before its request is checked: an open store (503 while it opens) and an allowed
    webhook (400); the webhook, if any."""
    if runtime.jobs is None:
        raise APIError(503, "the job store is not open yet", "model_loading", headers={"Retry-After": "5"})
    return webhook_of(request, params, runtime.settings)


async def store_job(runtime: Runtime, endpoint: str, task: Task, params: Any, images: list[str | bytes],
                    webhook: str | None, slots: int, caller: Caller | None = None) -> dict[str, Any]:
    """Store a request its serving class has checked as the synchronous route would (a job of ``slots``
    generations); the job resource (queued). 507 while the store is full, 503 when it stays away."""
    rt = runtime
    if rt.jobs is None:
        raise APIError(503, "the job store is not open yet", "model_loading", headers={"Retry-After": "5"})
    if slots > rt.limiter.slots:
        raise bad_request(f"this job needs {slots} generation slots; this server has {rt.limiter.slots}",
                          "too_many_generations", "n")
    store: JobStore = rt.jobs.store
    refused = store_refusal(store)
    if refused is not None:
        raise refused
    try:
        new = NewJob(endpoint, encode_spec(endpoint, task, params, images), slots=slots, webhook=webhook,
                     submitted_by=caller.name if caller is not None else None)
        row = await patiently(store, lambda: store.submit(new))
    except StoreError as exc:
        store.health.failed(exc)
        raise store_error(exc) from None
    rt.metrics.jobs_submitted.labels(caller.label if caller is not None else ANONYMOUS).inc()
    rt.jobs.worker.wake()
    return job_resource(row, rt.jobs.store)


# ---- a store that went away or filled up, as the routes answer it ------------------------------------
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
