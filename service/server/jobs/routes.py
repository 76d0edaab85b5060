"""The jobs API: thin routes over the job store (service.jobs) and the shared job resource."""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from service.jobs import JobRow, follow_events
from service.server.core.auth import Caller
from service.server.core.deps import current_caller, get_runtime
from service.server.core.errors import APIError, bad_request
from service.server.core.jobs import job_resource, patiently
from service.server.core.openapi import error_responses, event_stream_schema
from service.server.core.routing import v1_router
from service.server.core.runtime import Runtime
from service.server.core.serving_base import SSE_PING_SECONDS
from service.server.jobs.cursor import CURSOR_PREFIX, decode_cursor, encode_cursor
from service.server.jobs.executor import Jobs
from service.server.jobs.protocol import Job, JobDeleted, JobList, JobRequeued, JobStatus

router = v1_router(tags=["jobs"])

_NOT_FOUND = error_responses(404, descriptions={404: "no such job (or it expired)"})


def _jobs(runtime: Runtime = Depends(get_runtime)) -> Jobs:
    if runtime.jobs is None:
        raise APIError(503, "the job store is not open yet", "model_loading", headers={"Retry-After": "5"})
    return runtime.jobs


def _unknown(job_id: str) -> APIError:
    return APIError(404, f"no job {job_id!r} (it may have expired)", "job_not_found", "job_id")


async def _visible(jobs: Jobs, job_id: str, caller: Caller) -> JobRow:
    """The job, if it exists and ``caller`` may see it (its own, or any with an admin key); else 404, the
    same answer as for a job that does not exist, so ids of other keys' jobs cannot be probed."""
    job = await patiently(jobs.store, lambda: jobs.store.get(job_id))
    if job is None or not caller.may_see(job.submitted_by):
        raise _unknown(job_id)
    return job


@router.get("/jobs/{job_id}", summary="a job: status, progress, and its result once it succeeded",
            response_model=Job, responses=_NOT_FOUND)
async def get_job(job_id: str, jobs: Jobs = Depends(_jobs), caller: Caller = Depends(current_caller)) -> JSONResponse:
    job = await _visible(jobs, job_id, caller)
    return JSONResponse(job_resource(job, jobs.store))


@router.get("/jobs", summary="jobs, newest first, filtered by status and paginated", response_model=JobList,
            responses=error_responses(400))
async def list_jobs(status: JobStatus | None = None, limit: int = Query(20, ge=1, le=100),
                    after: str | None = Query(None, max_length=200,
                                              description="the previous page's `next_cursor` (works even once "
                                                          "that job is deleted), or its `last_id`"),
                    jobs: Jobs = Depends(_jobs), caller: Caller = Depends(current_caller)) -> JSONResponse:
    cursor = decode_cursor(after) if after is not None and after.startswith(CURSOR_PREFIX) else None
    mine = None if caller.admin else caller.name
    rows = await patiently(jobs.store, lambda: jobs.store.list_jobs(status, limit + 1, after if cursor is None else None,
                                                                   cursor, submitted_by=mine))
    page = rows[:limit]
    return JSONResponse({"object": "list", "data": [job_resource(j, jobs.store, include_result=False) for j in page],
                         "has_more": len(rows) > limit, "last_id": page[-1].id if page else None,
                         "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if page else None})


@router.post("/jobs/{job_id}/cancel", summary="cancel a queued or running job (a running one's engine pair is freed)",
             response_model=Job, responses=error_responses(404, 409, descriptions={409: "the job has finished"}))
async def cancel_job(job_id: str, jobs: Jobs = Depends(_jobs), caller: Caller = Depends(current_caller)) -> JSONResponse:
    await _visible(jobs, job_id, caller)
    job, canceled = await patiently(jobs.store, lambda: jobs.store.cancel(job_id))
    if job is None:
        raise _unknown(job_id)
    if not canceled:
        raise APIError(409, f"the job has finished ({job.status}); only queued and running jobs can be canceled",
                       "job_finished", "job_id")
    jobs.worker.cancel_local(job_id)  # here: at once; on another replica: at its next lease renewal
    jobs.worker.job_finished(job_id)
    return JSONResponse(job_resource(job, jobs.store))


@router.delete("/jobs/{job_id}", summary="remove a finished job, its events and its result",
               response_model=JobDeleted,
               responses=error_responses(404, 409, descriptions={409: "the job has not finished (cancel it first)"}))
async def delete_job(job_id: str, jobs: Jobs = Depends(_jobs), caller: Caller = Depends(current_caller)) -> JSONResponse:
    await _visible(jobs, job_id, caller)
    job, deleted = await patiently(jobs.store, lambda: jobs.store.delete(job_id))
    if job is None:
        raise _unknown(job_id)
    if not deleted:
        raise APIError(409, f"the job is {job.status}; cancel it before deleting it", "job_not_finished", "job_id")
    return JSONResponse({"id": job_id, "object": "job", "deleted": True})


#: Event ids are stored as 32-bit integers (PostgreSQL's int4): a larger Last-Event-ID is no event's.
MAX_EVENT_ID = 2**31 - 1


def last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id")
    if raw is None or raw == "":
        return 0
    if not raw.isascii() or not raw.isdigit() or len(raw) > 10 or int(raw) > MAX_EVENT_ID:
        raise bad_request(f"Last-Event-ID must be the id of an event of this job (an integer from 0 to {MAX_EVENT_ID})",
                          "invalid_last_event_id", "Last-Event-ID")
    return int(raw)


@router.get("/jobs/{job_id}/events", summary="the job's events (the route's SSE stream), resumable with Last-Event-ID",
            response_class=EventSourceResponse,
            responses={200: {"description": "server-sent events, each with an `id:`; a client reconnecting with "
                                            "`Last-Event-ID` gets what it missed, then the live events. The route's "
                                            "own events, and `requeued` when an attempt was cut and the job went "
                                            "back to the queue (the events after it are the next attempt's, from "
                                            "its start; not an error: keep reading)",
                             "content": {"text/event-stream": {"schema": {"oneOf": [
                                 {"type": "object", "description": "an event of the route's own stream"},
                                 *event_stream_schema({"requeued": JobRequeued})["oneOf"]]}}}},
                       **error_responses(400, 404)})
async def job_events(job_id: str, request: Request, jobs: Jobs = Depends(_jobs),
                     caller: Caller = Depends(current_caller)) -> Response:
    after = last_event_id(request)
    await _visible(jobs, job_id, caller)

    async def messages() -> AsyncIterator[dict[str, Any]]:
        async for ev in follow_events(jobs.store, job_id, after):
            yield {"id": str(ev.seq), "event": ev.event, "data": ev.data}

    return EventSourceResponse(messages(), ping=SSE_PING_SECONDS)
