"""Durable jobs: a generation submitted with ``Prefer: respond-async`` is stored, claimed by a replica
with a free slot, run under a renewed lease, and its events and result kept until ``--job-ttl``.

This layer sits above the task layer and below HTTP: it never imports ``service.server``. How a stored
request is run is given to it by the HTTP layer as a :class:`~service.jobs.worker.JobExecutor`.
"""

from service.jobs.follow import follow_events
from service.jobs.store import (
    FINISHED,
    STATUSES,
    JobEvent,
    JobRow,
    JobStore,
    NewJob,
    open_store,
)
from service.jobs.webhooks import RetryPolicy, WebhookRefused, WebhookSender, check_webhook_url
from service.jobs.worker import (
    JobExecutor,
    JobFailed,
    JobLost,
    JobMetrics,
    JobReporter,
    JobRetry,
    JobWorker,
    WorkerConfig,
)

__all__ = [
    "FINISHED",
    "JobEvent",
    "JobExecutor",
    "JobFailed",
    "JobLost",
    "JobMetrics",
    "JobReporter",
    "JobRetry",
    "JobRow",
    "JobStore",
    "JobWorker",
    "NewJob",
    "RetryPolicy",
    "STATUSES",
    "WebhookRefused",
    "WebhookSender",
    "WorkerConfig",
    "check_webhook_url",
    "follow_events",
    "open_store",
]
