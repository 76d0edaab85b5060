"""A retried attempt does not look like a failure (issue 32 item 8): when the engine dies under a stored
job, its stream gets a ``requeued`` event (documented in the OpenAPI document), not the route's ``error``
event that OpenAI-style clients stop at; an error that fails the job is still streamed as an error."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any, AsyncIterator

import pytest

from service.jobs import JobFailed, JobRetry, JobRow
from service.prompts import Task
from service.schema.emu35 import T2IRequest
from service.server.core.jobs import encode_spec
from service.server.jobs.executor import ServingExecutor


class FakeServing:
    """A serving class whose stream is two progress events and then the route's error event."""

    job_params = {"t2i": T2IRequest}

    def __init__(self, code: str) -> None:
        self.code = code

    async def job(self, *args: Any) -> Any:
        return SimpleNamespace(inputs=[object()])

    async def _admit_all(self, job: Any) -> list[Any]:
        return []

    async def _events(self, job: Any, admitted: Any, sink: Any) -> AsyncIterator[dict[str, str]]:
        for rows in (1, 2):
            yield {"event": "image_progress", "data": json.dumps({"rows": rows})}
        sink.failed("the engine stopped", self.code)
        yield {"event": "error", "data": json.dumps({"error": {"message": "the engine stopped", "code": self.code}})}


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.admitted = asyncio.Event()

    async def event(self, name: str, data: str) -> None:
        self.events.append(name)


def stored_job() -> JobRow:
    spec = encode_spec("t2i", Task.T2I, T2IRequest(prompt="a fox"), [])
    return JobRow(id="job-1", route="t2i", status="running", spec=spec, slots=1, created_at=0.0, started_at=0.0,
                  finished_at=None, expires_at=None, owner="r", lease_until=None, attempts=1, progress={},
                  result_path=None, error=None, webhook=None, webhook_state=None, claim_token="t")


@pytest.mark.parametrize("code", ["engine_unavailable", "shutting_down"])
def test_an_attempt_cut_by_the_engine_streams_no_error_and_goes_back_to_the_queue(code):
    rt = SimpleNamespace(job_servings={"t2i": FakeServing(code)})
    report = Recorder()
    with pytest.raises(JobRetry) as retry:
        asyncio.run(ServingExecutor(rt).run(stored_job(), report))  # type: ignore[arg-type]
    assert report.events == ["image_progress", "image_progress"]  # the worker adds `requeued`
    assert retry.value.code == code


def test_an_error_that_fails_the_job_is_still_streamed():
    rt = SimpleNamespace(job_servings={"t2i": FakeServing("generation_failed")})
    report = Recorder()
    with pytest.raises(JobFailed):
        asyncio.run(ServingExecutor(rt).run(stored_job(), report))  # type: ignore[arg-type]
    assert report.events == ["image_progress", "image_progress", "error"]


def test_the_requeued_event_is_in_the_openapi_document():
    from service.server.app import create_app
    from service.settings import load_settings

    doc = create_app(load_settings(["--demo"])).openapi()
    stream = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]
    assert "requeued" in stream["description"]
    kinds = stream["content"]["text/event-stream"]["schema"]["oneOf"]
    requeued = next(k for k in kinds if k.get("properties", {}).get("event", {}).get("const") == "requeued")
    data = requeued["properties"]["data"]["contentSchema"]
    assert set(data["required"]) == {"message", "code", "attempts"}
