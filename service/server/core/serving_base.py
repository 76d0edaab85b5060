"""The one request template every serving class follows, after SGLang's ``handle_request``.

:meth:`ServingBase.create` owns the whole sequence: accept → the subclass's inputs → admit (one slot per
generation) → prepare → run, watching the connection → the subclass's rendering → release of every
slot, whatever happens. Subclasses supply :meth:`job` (validate fields, decode uploads, name the
generations) and :meth:`render` (the JSON answer); a streamed job is rendered by :meth:`stream` and
:meth:`render_event`. A streamed job of several generations admits and prepares all of them before the
response starts (so every error is still a 4xx status), then runs them side by side as one stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from service.prompts import Task
from service.server.core.errors import APIError, bad_request
from service.server.core.image_io import image_bytes_from_text, open_image
from service.server.core.jobs import JobSink, prefers_async, submit_job
from service.server.core.limiter import Overloaded, Slot
from service.server.core.protocol import DecodingParams, SamplingOverrides
from service.server.core.runtime import Runtime
from service.server.core.streams import merge_streams
from service.task import (
    DecodingChoice,
    EngineUnavailableError,
    Finished,
    GenerationInput,
    GenerationRunner,
    Outcome,
    PlanError,
    Prepared,
    PreviewSchedule,
    SamplingOverride,
)

T = TypeVar("T")



def model_loading() -> APIError:
    return APIError(503, "the model is still loading", "model_loading", headers={"Retry-After": "10"})


def overloaded(exc: Overloaded) -> APIError:
    """The answer when slots and queue are full, with the limiter's estimate of when to come back."""
    return APIError(429, str(exc), "overloaded", headers={"Retry-After": str(exc.retry_after)})


def shutting_down(message: str = "the service is shutting down") -> APIError:
    return APIError(503, message, "shutting_down")


def engine_unavailable() -> APIError:
    """The answer while (and after) the engine dies: the process exits and the orchestrator restarts it."""
    return APIError(503, "the engine is unavailable; the service is restarting", "engine_unavailable",
                    headers={"Retry-After": "30"})

logger = logging.getLogger(__name__)

#: Seconds between keep-alive comments on an idle stream (proxies drop silent connections).
SSE_PING_SECONDS = 15


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


def new_request_id(prefix: str = "gen") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sampling_override(over: SamplingOverrides | None) -> SamplingOverride | None:
    """The API's sampling fields as the task layer's override (None: all defaults)."""
    if over is None:
        return None
    o = SamplingOverride(over.top_k, over.top_p, over.temperature)
    return None if o.empty else o


def decoding_choice(params: DecodingParams | None) -> DecodingChoice | None:
    """The API's ``decoding`` object as the task layer's choice (None: the server's default schedule)."""
    if params is None:
        return None
    return DecodingChoice(params.mode, params.draft_len, params.window)


@dataclass(frozen=True)
class Job:
    """One HTTP request as the template runs it: its generations, and how to answer."""

    endpoint: str
    inputs: list[GenerationInput]
    id_prefix: str = "gen"
    stream: bool = False
    previews: PreviewSchedule | None = None
    options: Any = None  # the subclass's own rendering options (its parsed request, per-stream state)


@dataclass(frozen=True)
class Admitted:
    """A generation that holds an admission slot and is ready to run."""

    slot: Slot
    prepared: Prepared


async def run_cancellable(request: Request, work: Awaitable[T], runtime: Runtime, request_id: str | None = None) -> T:
    """Await ``work`` while watching the connection: if the client disconnects first, cancel the work
    (waiting for a slot gives the queue place back; running aborts the engine pair) and raise
    :class:`ClientDisconnected`. ``request_id`` names work in flight, which a drain waits for."""
    task = asyncio.ensure_future(work)
    if request_id is not None:
        runtime.inflight[request_id] = task

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        runtime.metrics.disconnects.inc()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if request_id is not None:
            runtime.inflight.pop(request_id, None)
        if not task.done():
            task.cancel()


class ServingBase:
    #: each endpoint's request model, so a stored job's request can be rebuilt (subclasses; app.py maps
    #: each endpoint to its serving class in ``Runtime.job_servings``)
    job_params: dict[str, type[BaseModel]] = {}

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    @property
    def variant(self):
        return self.rt.settings.variant

    # ---- the template ------------------------------------------------------------------------------
    async def create(self, endpoint: str, task: Task, params: Any, images: list[str | bytes],
                     request: Request) -> Response:
        """Serve one request from start to finish (see the module docstring); with ``Prefer:
        respond-async``, check it the same way, store it as a job and answer 202."""
        self.ensure_accepting()
        if prefers_async(request):
            return await self.submit(endpoint, task, params, images, request)
        self._check_room()  # a full service answers 429 before decoding any upload
        job = await self.job(endpoint, task, params, images, request)
        if job.stream:
            try:  # a client that leaves while queued gives its place back
                admitted = await run_cancellable(request, self._admit_all(job), self.rt)
            except ClientDisconnected:
                return Response(status_code=499)
            return self.stream(job, admitted, self._events(job, admitted))
        try:
            async with asyncio.TaskGroup() as group:
                runs = [group.create_task(self._run(request, job, gen)) for gen in job.inputs]
        except BaseExceptionGroup as eg:  # one failed: the others were cancelled; answer with the first
            first = eg.exceptions[0]
            if isinstance(first, ClientDisconnected):
                return Response(status_code=499)
            raise first from None
        return await self.render(job, [run.result() for run in runs])

    async def submit(self, endpoint: str, task: Task, params: Any, images: list[str | bytes],
                     request: Request) -> Response:
        """The request as a durable job: 202 with ``Location`` and the job resource."""
        body = await submit_job(self, endpoint, task, params, images, request)
        return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"],
                                                            "Preference-Applied": "respond-async"})

    async def check_plans(self, job: Job) -> None:
        """What admission would refuse about the job's generations (context, references): a 400 now,
        not a failed job later. Nothing is held afterwards."""
        runner = self._runner()
        for gen in job.inputs:
            try:
                await runner.prepare(gen, new_request_id("chk"))
            except PlanError as exc:
                raise bad_request(str(exc), "invalid_generation", exc.param) from None

    async def job(self, endpoint: str, task: Task, params: Any, images: list[str | bytes],
                  request: Request) -> Job:
        """Check the request and decode its inputs (subclasses)."""
        raise NotImplementedError

    async def render(self, job: Job, outcomes: list[Outcome]) -> Response:
        """The JSON answer of finished generations (subclasses)."""
        raise NotImplementedError

    def stream(self, job: Job, admitted: list[Admitted], events: AsyncIterator[dict[str, str]]) -> Response:
        """The streamed answer (subclasses that stream)."""
        raise APIError(400, "this endpoint does not stream", "unsupported_value", "stream")

    async def render_event(self, job: Job, index: int, ev: Any) -> dict[str, str] | None:
        """One run event of generation ``index`` as an SSE message, or None to send nothing (subclasses
        that stream)."""
        raise NotImplementedError

    def error_event(self, job: Job, message: str, code: str) -> dict[str, str]:
        """A failure after the stream started, as an SSE message in the family's own shape."""
        raise NotImplementedError

    # ---- steps -------------------------------------------------------------------------------------
    def _runner(self) -> GenerationRunner:
        runner = self.rt.runner
        if runner is None:  # ensure_accepting() let the request in, so the runtime is ready
            raise model_loading()
        return runner

    def ensure_accepting(self) -> None:
        state = self.rt.state
        if state == "loading":
            raise model_loading()
        if state in ("draining", "stopped"):
            raise shutting_down()
        if state == "failed":
            raise APIError(503, f"the service failed to start: {self.rt.error}", "engine_failed")
        if state == "dead":
            raise engine_unavailable()

    async def decode_images(self, images: list[str | bytes], param: str) -> list[Any]:
        """Uploaded images (base64 text or raw bytes) → RGB PIL images, decoded off the event loop."""
        s = self.rt.settings

        def one(i: int, item: str | bytes):
            name = f"{param}[{i}]"
            raw = item if isinstance(item, bytes) else image_bytes_from_text(item, s.max_image_bytes, name)
            return open_image(raw, s.max_image_bytes, s.max_image_pixels, name)

        return await asyncio.to_thread(lambda: [one(i, x) for i, x in enumerate(images)])

    async def _admit_all(self, job: Job) -> list[Admitted]:
        """Admit and prepare every generation of a streamed job at once; if any fails, or the wait is
        cancelled (the client left), free the slots already taken and raise (before the response starts)."""
        tasks = [asyncio.ensure_future(self._admit_and_prepare(g, job.id_prefix)) for g in job.inputs]

        def release_taken() -> None:
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is None:
                    t.result()[0].release()

        try:
            await asyncio.wait(tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            release_taken()
            raise
        failures = [exc for t in tasks if (exc := t.exception()) is not None]
        if failures:
            release_taken()
            raise failures[0]
        return [Admitted(*t.result()) for t in tasks]

    def _check_room(self) -> None:
        try:
            self.rt.limiter.check_room()
        except Overloaded as exc:
            raise overloaded(exc) from None

    async def _admit_and_prepare(self, gen: GenerationInput, id_prefix: str) -> tuple[Slot, Prepared]:
        rid = new_request_id(id_prefix)
        try:
            slot = await self.rt.limiter.acquire()
        except Overloaded as exc:
            raise overloaded(exc) from None
        try:
            # a request that waited in the queue while the service began to drain (or its engine died)
            # is answered as a newcomer would be, instead of starting work the drain would cut
            self.ensure_accepting()
            return slot, await self._runner().prepare(gen, rid)
        except PlanError as exc:
            slot.release()
            raise bad_request(str(exc), "invalid_generation", exc.param) from None
        except BaseException:
            slot.release()
            raise

    def _stopped_by_shutdown(self, out: Outcome) -> bool:
        return out.finish_reason == "abort" and self.rt.state in ("draining", "stopped")

    async def _run(self, request: Request, job: Job, gen: GenerationInput) -> Outcome:
        # watched from the start: a client that leaves while queued gives its place back
        slot, prepared = await run_cancellable(request, self._admit_and_prepare(gen, job.id_prefix), self.rt)
        try:
            out = await run_cancellable(request, self._outcome(job.endpoint, prepared), self.rt,
                                        prepared.request.request_id)
            if self._stopped_by_shutdown(out):
                raise shutting_down("the service is shutting down; the generation was stopped")
            return out
        except EngineUnavailableError as exc:
            self.rt.engine_died(str(exc))
            raise engine_unavailable() from None
        finally:
            slot.release()

    async def _outcome(self, endpoint: str, prepared: Prepared) -> Outcome:
        """Run to the end (no events forwarded) and record the metrics."""
        result: Outcome | None = None
        async with contextlib.aclosing(self._runner().run(prepared)) as events:
            async for ev in events:
                if isinstance(ev, Finished):
                    result = ev.outcome
        assert result is not None
        await self._finish(endpoint, result)
        return result

    async def _events(self, job: Job, admitted: list[Admitted],
                      sink: JobSink | None = None) -> AsyncIterator[dict[str, str]]:
        """Streamed runs as SSE messages; every slot is released when the stream ends, however it ends.
        A job's ``sink`` also sees every run event and the failure, if any."""
        rids = [a.prepared.request.request_id for a in admitted]
        task = asyncio.current_task()
        for rid in rids:
            if task is not None:
                self.rt.inflight[rid] = task
        try:
            runner = self._runner()
            runs = [runner.run(a.prepared, job.previews) for a in admitted]
            async with contextlib.aclosing(merge_streams(runs)) as events:
                async for index, ev in events:
                    if sink is not None:
                        sink.saw(index, ev)
                    if isinstance(ev, Finished):
                        if self._stopped_by_shutdown(ev.outcome):  # an error event, then a proper end
                            err = shutting_down("the service is shutting down; the generation was stopped")
                            if sink is not None:
                                sink.failed(err.message, err.code)
                            yield self.error_event(job, err.message, err.code)
                            return
                        await self._finish(job.endpoint, ev.outcome)
                    message = await self.render_event(job, index, ev)
                    if message is not None:
                        yield message
        except asyncio.CancelledError:
            if self.rt.state not in ("draining", "stopped"):
                self.rt.metrics.disconnects.inc()
            raise
        except EngineUnavailableError as exc:
            self.rt.engine_died(str(exc))
            err = engine_unavailable()
            if sink is not None:
                sink.failed(err.message, err.code)
            yield self.error_event(job, err.message, err.code)
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            logger.exception("generation %s failed mid-stream", ",".join(rids))
            if isinstance(exc, APIError):
                detail, code = exc.message, exc.code
            else:  # like the 500 handler: the log has the exception, the client gets no internals
                detail, code = f"the generation failed (request {','.join(rids)})", "generation_failed"
            if sink is not None:
                sink.failed(detail, code)
            yield self.error_event(job, detail, code)
        finally:
            for rid in rids:
                self.rt.inflight.pop(rid, None)
            for a in admitted:
                a.slot.release()

    async def _finish(self, endpoint: str, out: Outcome) -> None:
        """Metrics and the record file of a finished generation."""
        m = self.rt.metrics
        m.latency.labels(endpoint).observe(out.seconds)
        if out.time_to_first_token is not None:
            m.ttft.labels(endpoint).observe(out.time_to_first_token)
        for seconds in out.image_seconds:
            m.image_seconds.observe(seconds)
        m.prompt_tokens.inc(out.usage.prompt_tokens)
        m.text_tokens.inc(out.usage.text_tokens)
        m.visual_tokens.inc(out.usage.visual_tokens)
        m.images.inc(len(out.images))
        if self.rt.records is not None and out.finish_reason != "abort":
            await asyncio.to_thread(self.rt.records.save, out.request_id, out.record)
