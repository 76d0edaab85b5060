"""Prometheus metrics, all named ``emu35_*``, in a registry owned by one app.

Request-level series are updated by the serving classes; the engine's and the VQ worker's own figures
are read at scrape time by a collector, so they are never stale and cost nothing between scrapes.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.types import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_VQ_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)

#: Every metric family the service exports (names as Prometheus shows them, without suffixes such as
#: ``_bucket``); the deployment tests check alerts, autoscaling and dashboards against this list.
METRIC_NAMES = (
    "emu35_requests_total",
    "emu35_request_duration_seconds",
    "emu35_time_to_first_token_seconds",
    "emu35_image_generation_seconds",
    "emu35_prompt_tokens_total",
    "emu35_generated_text_tokens_total",
    "emu35_generated_visual_tokens_total",
    "emu35_images_generated_total",
    "emu35_client_disconnects_total",
    "emu35_requests_in_flight",
    "emu35_queue_depth",
    "emu35_queue_capacity",
    "emu35_vq_encode_seconds",
    "emu35_vq_decode_seconds",
    "emu35_vq_queue_depth",
    "emu35_ready",
    "emu35_running_pairs",
    "emu35_waiting_pairs",
    "emu35_engine_running_sequences",
    "emu35_engine_waiting_sequences",
    "emu35_engine_unfinished_sequences",
    "emu35_engine_kv_cache_usage",
    "emu35_engine_steps_total",
    "emu35_engine_preempted_sequences_total",
    "emu35_jobs",
    "emu35_jobs_oldest_queued_age_seconds",
    "emu35_job_lease_expiries_total",
    "emu35_job_requeues_total",
)


class _LiveCollector(Collector):
    """Reads the engine's and the VQ worker's state when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats | None], ready: Callable[[], bool],
                 vq_queue: Callable[[], int]) -> None:
        self._stats, self._ready, self._vq_queue = stats, ready, vq_queue

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("emu35_ready", "1 when the engine and the VQ worker answer and the service admits work",
                                value=1.0 if self._ready() else 0.0)
        yield GaugeMetricFamily("emu35_vq_queue_depth", "VQ encode/decode jobs waiting", value=self._vq_queue())
        s = self._stats()
        if s is None:
            return
        yield GaugeMetricFamily("emu35_running_pairs", "generations the engine is decoding", value=s.running_pairs)
        yield GaugeMetricFamily("emu35_waiting_pairs", "generations submitted to the engine, not yet started",
                                value=s.waiting_pairs)
        yield GaugeMetricFamily("emu35_engine_running_sequences", "engine sequences (cond + uncond) running",
                                value=s.running_sequences)
        yield GaugeMetricFamily("emu35_engine_waiting_sequences", "engine sequences waiting",
                                value=s.waiting_sequences)
        yield GaugeMetricFamily("emu35_engine_unfinished_sequences", "engine sequences not finished (live)",
                                value=s.unfinished_sequences)
        yield GaugeMetricFamily("emu35_engine_kv_cache_usage", "fraction of the KV cache in use", value=s.kv_usage)
        yield CounterMetricFamily("emu35_engine_steps", "engine scheduler steps", value=s.steps)
        yield CounterMetricFamily("emu35_engine_preempted_sequences", "sequences the engine preempted",
                                  value=s.preempted_sequences)


class Metrics:
    """The service's metrics; one instance per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("emu35_requests", "finished HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("emu35_request_duration_seconds", "end-to-end generation latency",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("emu35_time_to_first_token_seconds", "time from admission to the first generated token",
                              ["endpoint"], buckets=_TTFT_BUCKETS, registry=r)
        self.image_seconds = Histogram("emu35_image_generation_seconds", "time from an image's header to its pixels",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("emu35_prompt_tokens", "prompt tokens (cond sequence)", registry=r)
        self.text_tokens = Counter("emu35_generated_text_tokens", "generated non-visual tokens", registry=r)
        self.visual_tokens = Counter("emu35_generated_visual_tokens", "generated visual tokens", registry=r)
        self.images = Counter("emu35_images_generated", "images generated", registry=r)
        self.disconnects = Counter("emu35_client_disconnects", "generations aborted because the client left",
                                   registry=r)
        self.in_flight = Gauge("emu35_requests_in_flight", "generations admitted (running or being prepared)",
                               registry=r)
        self.queue_depth = Gauge("emu35_queue_depth", "requests waiting for a generation slot", registry=r)
        self.queue_capacity = Gauge("emu35_queue_capacity", "slots + queue places (429 beyond)", registry=r)
        self.vq_encode = Histogram("emu35_vq_encode_seconds", "VQ encode call time", buckets=_VQ_BUCKETS, registry=r)
        self.vq_decode = Histogram("emu35_vq_decode_seconds", "VQ decode call time", buckets=_VQ_BUCKETS, registry=r)
        # durable jobs: read from the shared store, so every replica reports the whole queue (the HPA's
        # signal is emu35_jobs{status="queued"})
        self.jobs = Gauge("emu35_jobs", "jobs in the store by status", ["status"], registry=r)
        self.jobs_oldest_queued = Gauge("emu35_jobs_oldest_queued_age_seconds",
                                        "age of the oldest queued job (0: none queued)", registry=r)
        self.jobs_submitted = Counter("emu35_jobs_submitted", "jobs submitted to this replica, by the name of the "
                                      "API key that submitted them", ["key"], registry=r)
        self.job_lease_expiries = Counter("emu35_job_lease_expiries", "running jobs whose lease expired "
                                          "(their replica died); queued again or failed", registry=r)
        self.job_requeues = Counter("emu35_job_requeues", "job attempts given back to the queue by their replica "
                                    "(the engine died, or the replica was busy or stopping)", registry=r)

    def attach_live(self, stats: Callable[[], EngineStats | None], ready: Callable[[], bool],
                    vq_queue: Callable[[], int]) -> None:
        self.registry.register(_LiveCollector(stats, ready, vq_queue))

    def observe_vq(self, kind: str, seconds: float, items: int) -> None:
        (self.vq_encode if kind == "encode" else self.vq_decode).observe(seconds)

    # the job worker's metrics sink (service.jobs.JobMetrics)
    def lease_expired(self, n: int) -> None:
        self.job_lease_expiries.inc(n)

    def job_requeued(self) -> None:
        self.job_requeues.inc()

    def jobs_counted(self, counts: dict[str, int], oldest_queued_age: float) -> None:
        for status, n in counts.items():
            self.jobs.labels(status).set(n)
        self.jobs_oldest_queued.set(oldest_queued_age)

    def render(self) -> bytes:
        return generate_latest(self.registry)
