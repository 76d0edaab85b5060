"""The job resource as the API documents it (answers are built by service.server.core.jobs.job_resource)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


class JobProgress(BaseModel):
    images: int = Field(0, description="images finished")
    rows: int = Field(0, description="rows of the current image drawn")


class JobLinks(BaseModel):
    self: str
    events: str


class Job(BaseModel):
    """A generation submitted with `Prefer: respond-async`."""

    id: str = Field(..., description="unguessable (128 random bits)")
    object: Literal["job"] = "job"
    status: JobStatus
    route: str = Field(..., description="the generation endpoint it was submitted to (t2i, images_generations, …)")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = Field(None, description="when a finished job is removed (--job-ttl)")
    attempts: int = Field(0, description="times a replica claimed it (a restart or a lost lease claims it again)")
    replica: str | None = Field(None, description="the replica running it (--replica-id), while it runs")
    progress: JobProgress
    result: dict[str, Any] | None = Field(None, description="when succeeded: the body the synchronous route answers")
    error: dict[str, Any] | None = Field(None, description="when failed or canceled: {message, code}")
    links: JobLinks


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    last_id: str | None = Field(None, description="the last job's id (also accepted as `after`)")
    next_cursor: str | None = Field(None, description="pass as `after` for the next page; unlike `last_id` it "
                                                      "still works once that job is deleted or expired")


class JobDeleted(BaseModel):
    id: str
    object: Literal["job"] = "job"
    deleted: Literal[True] = True


class JobRequeued(BaseModel):
    """The data of a job stream's ``requeued`` event: this attempt was cut (the engine died, the replica
    stopped or lost its lease) and the job went back to the queue. The events after it are the next
    attempt's, from its start; a follower keeps reading (it is not an error)."""

    message: str = Field(..., description="why the attempt ended")
    code: str = Field(..., description="engine_unavailable, shutting_down, overloaded, model_loading, "
                                       "lease_expired or server_restarted")
    attempts: int = Field(..., description="claims of the job so far (the next attempt is one more)")
