"""What one service process holds for its life: the engine, the VQ worker, the generation runner, the
admission limiter, the metrics and the record store — and its state (loading, ready, draining).

The app's lifespan starts it in the background so ``/health`` answers while the model loads (a large
checkpoint takes minutes); ``/ready`` turns true when the engine and the VQ worker answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

from service.engine.protocol import AsyncEngine
from service.server.limiter import AdmissionLimiter
from service.server.metrics import Metrics
from service.server.records import RecordStore
from service.server.settings import Settings
from service.streaming import GenerationRunner
from service.tokenizer import Emu35Tokenizer
from service.vq.worker import VqWorker

logger = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed", "draining", "stopped"]


def build_engine(settings: Settings, tokenizer: Emu35Tokenizer) -> AsyncEngine:
    """The engine the settings ask for (not started)."""
    if settings.engine_kind == "vllm":
        from service.engine.config import VllmEngineConfig
        from service.engine.vllm_engine import VllmEngine
        from service.quant.serving import engine_model

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # only read by the CPU build (GiB)
        # an msModelSlim W8A8 checkpoint: 'ascend' with vllm-ascend, else its compressed-tensors form
        assert settings.model is not None  # the settings refuse a missing --model
        served = engine_model(settings.model, settings.quantization, settings.resolved_w8a8_cache_dir)
        cfg = VllmEngineConfig(
            model=str(served.path), tokenizer=str(settings.tokenizer_dir),
            tensor_parallel_size=settings.tensor_parallel_size, dtype=settings.dtype,
            max_model_len=settings.max_model_len, gpu_memory_utilization=settings.gpu_memory_utilization,
            max_pairs=settings.max_concurrent, quantization=served.quantization,
            graph_mode="eager" if settings.enforce_eager else "auto")
        return VllmEngine(cfg)
    from service.engine.async_reference import AsyncReferenceEngine

    return AsyncReferenceEngine(settings.model, tokenizer, settings.resolved_device, settings.dtype,
                                settings.max_model_len)


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

    def __post_init__(self) -> None:
        s = self.settings
        self.limiter = AdmissionLimiter(s.max_concurrent, s.max_queue, on_change=self._admission_changed)
        self.metrics.queue_capacity.set(self.limiter.capacity)
        self.metrics.attach_live(self._stats, lambda: self.state == "ready",
                                 lambda: self.vq.queue_depth if self.vq else 0)
        if s.output_dir is not None:
            self.records = RecordStore(s.output_dir)

    def _admission_changed(self, active: int, waiting: int) -> None:
        self.metrics.in_flight.set(active)
        self.metrics.queue_depth.set(waiting)

    def _stats(self):
        return self.engine.stats() if self.engine is not None and self.state in ("ready", "draining") else None

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load tokenizer, VQ worker and engine; on failure record why (``/ready`` reports it)."""
        s = self.settings
        try:
            self.tokenizer = await asyncio.to_thread(Emu35Tokenizer.from_dir, s.tokenizer_dir)
            self.vq = VqWorker(lambda: _load_vq(s), observer=self.metrics.observe_vq)
            await asyncio.to_thread(self.vq.start)
            self.engine = self.engine_factory(s, self.tokenizer)
            # vLLM's AsyncLLM starts its output handler lazily on the loop that first uses it, so it
            # can be built in a worker thread while this loop keeps answering /health.
            await asyncio.to_thread(self.engine.start)
            await self.engine.self_check()
            self.runner = GenerationRunner(self.engine, self.vq, self.tokenizer, image_area=s.image_area)
            if self.state == "loading":
                self.state = "ready"
            logger.info("emu35-serve ready: engine=%s model=%s vq_device=%s", s.engine_kind, s.model,
                        s.resolved_vq_device)
        except Exception as exc:  # noqa: BLE001 - reported by /ready and the log
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            logger.exception("emu35-serve failed to start")

    async def ready(self) -> bool:
        if self.state != "ready" or self.engine is None or self.vq is None or not self.vq.alive:
            return False
        return await self.engine.health()

    def begin_drain(self) -> None:
        """Stop admitting work; in-flight generations go on (see :meth:`drain`)."""
        if self.state in ("loading", "ready"):
            self.state = "draining"

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for in-flight generations, then abort what is left."""
        deadline = time.monotonic() + grace
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid, task in list(self.inflight.items()):
            logger.warning("shutdown: aborting generation %s after the %.0f s grace period", rid, grace)
            task.cancel()
        if self.inflight:
            await asyncio.gather(*self.inflight.values(), return_exceptions=True)

    async def stop(self) -> None:
        self.state = "stopped"
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.shutdown()  # on the loop's thread: vLLM cancels its output task
        if self.vq is not None:
            self.vq.stop()


def _load_vq(s: Settings):
    from service.vq import VisionTokenizer

    dtype = "float32" if s.resolved_vq_device == "cpu" or s.dtype == "auto" else s.dtype
    return VisionTokenizer.from_pretrained(s.vq_model, device=s.resolved_vq_device, dtype=dtype)
