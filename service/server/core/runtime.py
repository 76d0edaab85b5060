"""What one service process holds for its life: the engine, the VQ worker, the generation runner, the
admission limiter, the metrics and the record store — and its state (loading, ready, draining).

The app's lifespan starts it in the background so ``/health`` answers while the model loads (a large
checkpoint takes minutes); ``/ready`` turns true when the engine and the VQ worker answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

from service.server.core.auth import ApiKeys, load_api_keys
from service.server.core.limiter import AdmissionLimiter
from service.server.core.metrics import Metrics
from service.server.core.records import RecordStore
from service.settings import Settings
from service.task import (
    AsyncEngine,
    GenerationRunner,
    build_engine,
    load_tokenizer,
    model_kind,
    serving_engine,
    start_vq_worker,
)

if TYPE_CHECKING:  # built by the task layer; only their types are named here
    from service.task import Emu35Tokenizer
    from service.task.resources import VqWorker

logger = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed", "draining", "stopped", "dead"]

#: Seconds between engine health checks once the service is ready.
HEALTH_POLL_SECONDS = 0.5
#: Seconds a dead engine's in-flight requests get to receive their error before they are cut.
DEAD_ENGINE_GRACE_SECONDS = 2.0
#: Seconds generations aborted at the end of a drain get to answer their clients (an SSE ``error``
#: event and a proper end of stream, a 503) before the server stops.
ABORT_ANSWER_SECONDS = 3.0


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    tokenizer: Emu35Tokenizer | None = None
    engine: AsyncEngine | None = None
    vq: VqWorker | None = None
    runner: GenerationRunner | None = None
    records: RecordStore | None = None
    state: State = "loading"
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    inflight: dict[str, asyncio.Task] = field(default_factory=dict)  # request id → the task serving it
    #: how the engine is made (benchmarks substitute one that replays fixed ids)
    engine_factory: Callable[[Settings, Emu35Tokenizer], AsyncEngine] = build_engine
    drain_deadline: float | None = None  # monotonic time at which a drain aborts what is left
    watchdog: asyncio.Task | None = None  # polls the engine's health once ready
    aborting_since: float | None = None  # when the drain aborted what was still running
    abort_task: asyncio.Task | None = None  # that abort (held so the loop cannot collect it mid-way)
    #: durable jobs: the serving class of each generation endpoint (a stored request runs through it),
    #: the store and worker once open (service.server.jobs.executor.Jobs), and who wants to hear of a free slot
    job_servings: dict[str, Any] = field(default_factory=dict)
    jobs: Any = None
    api_keys: ApiKeys = field(init=False)  # from --api-key and --api-keys-file (service.server.core.auth)
    limiter_listeners: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.settings
        self.model_kind = model_kind(s)  # what /v1/models and /ready say is served
        self.api_keys = load_api_keys(s)  # a bad keys file stops the start (ApiKeysError)
        self.engine_kind = serving_engine(s)  # its name and the schedules it offers (/v1/models)
        self.limiter = AdmissionLimiter(s.max_concurrent, s.max_queue, on_change=self._admission_changed)
        self.metrics.queue_capacity.set(self.limiter.capacity)
        self.metrics.attach_live(self._stats, lambda: self.state == "ready",
                                 lambda: self.vq.queue_depth if self.vq else 0)
        if s.output_dir is not None:
            self.records = RecordStore(s.output_dir)

    def _admission_changed(self, active: int, waiting: int) -> None:
        self.metrics.in_flight.set(active)
        self.metrics.queue_depth.set(waiting)
        for listener in self.limiter_listeners:
            listener()

    def _stats(self):
        return self.engine.stats() if self.engine is not None and self.state in ("ready", "draining") else None

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load tokenizer, VQ worker and engine; on failure record why (``/ready`` reports it)."""
        s = self.settings
        try:
            self.tokenizer = await asyncio.to_thread(load_tokenizer, s)
            self.vq = start_vq_worker(s, observer=self.metrics.observe_vq)
            await asyncio.to_thread(self.vq.start)
            self.engine = self.engine_factory(s, self.tokenizer)
            # vLLM's AsyncLLM starts its output handler lazily on the loop that first uses it, so it
            # can be built in a worker thread while this loop keeps answering /health.
            await asyncio.to_thread(self.engine.start)
            await self.engine.self_check()
            self.runner = GenerationRunner(self.engine, self.vq, self.tokenizer, image_area=s.image_area,
                                           kind=self.model_kind, decoding=s.default_decoding,
                                           engine_name=self.engine_kind.name)
            if self.state == "loading":
                self.state = "ready"
                self.watchdog = asyncio.create_task(self._watch_engine(), name="emu35-engine-watchdog")
            logger.info("emu35-serve ready: engine=%s model=%s vq_device=%s", self.engine_kind.name, s.model,
                        s.resolved_vq_device)
        except Exception as exc:  # noqa: BLE001 - reported by /ready and the log
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            logger.exception("emu35-serve failed to start; exiting")

    def fail_start(self, reason: str) -> None:
        """A part of the start other than the model failed (the job store): exit, saying why once."""
        if self.state in ("loading", "ready"):
            logger.error("emu35-serve cannot start: %s; exiting", reason)
            self.state = "failed"
            self.error = reason

    async def ready(self) -> bool:
        if self.state != "ready" or self.engine is None or self.vq is None or not self.vq.alive:
            return False
        if self.jobs is None:  # the job store is not open yet (or unreachable: see --job-store-wait)
            return False
        return await self.engine.health()

    # ---- liveness: a process whose engine died (or never started) exits so it is restarted -------
    @property
    def alive(self) -> bool:
        """The liveness answer: False once the engine died or the start failed."""
        return self.state not in ("failed", "dead")

    def should_exit(self) -> bool:
        """Stop serving now: the start failed, or a drain (a signal, or a dead engine) is complete.
        Called on every server tick: it also aborts what outlived the grace (see :meth:`drain_tick`)."""
        return self.state == "failed" or self.drain_tick()

    def engine_died(self, reason: str) -> None:
        """The engine is gone for good: refuse new work, give in-flight requests a moment to receive
        their errors, then exit non-zero (see :meth:`should_exit`)."""
        if self.state in ("dead", "stopped"):
            return
        logger.error("engine died (%s): failing in-flight work and exiting so the orchestrator restarts "
                     "this process", reason)
        self.state = "dead"
        self.error = f"engine died: {reason}"
        deadline = time.monotonic() + DEAD_ENGINE_GRACE_SECONDS
        self.drain_deadline = deadline if self.drain_deadline is None else min(self.drain_deadline, deadline)

    async def _watch_engine(self) -> None:
        while self.state in ("ready", "draining"):
            await asyncio.sleep(HEALTH_POLL_SECONDS)
            if self.engine is not None and self.state in ("ready", "draining") and not await self.engine.health():
                self.engine_died("it stopped answering its health check")
                return

    # ---- draining: the one place that decides when in-flight work is given up --------------------
    def begin_drain(self, grace: float) -> None:
        """Stop admitting work; in-flight generations get ``grace`` seconds from the first call."""
        if self.state in ("loading", "ready"):
            self.state = "draining"
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + grace
            logger.info("draining: %d generation(s) in flight, grace %.0f s", len(self.inflight), grace)

    def drain_tick(self) -> bool:
        """One step of a drain; True once it is complete. When the grace runs out, what is still running
        is aborted through the engine, so each request answers its client properly (a stream ends with
        an ``error`` event, a JSON request gets a 503); after ``ABORT_ANSWER_SECONDS`` the drain is
        complete whatever is left."""
        if self.drain_deadline is None:
            return False
        if not self.inflight:
            return True
        now = time.monotonic()
        if now < self.drain_deadline:
            return False
        if self.aborting_since is None:
            self.aborting_since = now
            self.abort_task = asyncio.get_running_loop().create_task(self._abort_inflight())
        return now >= self.aborting_since + ABORT_ANSWER_SECONDS

    async def _abort_inflight(self) -> None:
        for rid in list(self.inflight):
            logger.warning("shutdown: aborting generation %s (the drain's grace period is over)", rid)
            if self.engine is not None:
                with contextlib.suppress(Exception):
                    await self.engine.abort(rid)

    async def drain(self, grace: float) -> None:
        """Drain (see :meth:`begin_drain`): wait until it is complete, then cut whatever is left."""
        self.begin_drain(grace)
        while not self.drain_tick():
            await asyncio.sleep(0.05)
        for task in list(self.inflight.values()):
            task.cancel()
        if self.inflight:
            await asyncio.gather(*self.inflight.values(), return_exceptions=True)

    async def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.state = "stopped"
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.shutdown()  # on the loop's thread: vLLM cancels its output task
        if self.vq is not None:
            self.vq.stop()

