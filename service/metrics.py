"""Every Prometheus series of the server, defined once, in a registry per app.

No label takes a task id or a class name: hundreds of tasks must not blow up the series count. Series that mirror
state owned elsewhere (the router cache, the job store) are read at scrape time by a collector, so they can never
drift from their source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service.routers.cache import CacheStats

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
TRAINING_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SERVABLE_BUCKETS = (1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass(frozen=True)
class JobSnapshot:
    """What the job store says at scrape time."""

    counts: dict[str, int]
    training_seconds: Sequence[float]


class _StateCollector(Collector):
    """Router cache and job-store series, computed at scrape time."""

    def __init__(self, cache_stats: Callable[[], CacheStats], jobs: Callable[[], JobSnapshot]) -> None:
        self._cache_stats = cache_stats
        self._jobs = jobs

    def collect(self) -> Iterable[Metric]:
        stats = self._cache_stats()
        capacity = GaugeMetricFamily(
            "care_router_cache_capacity_bytes", "Cap of the router cache tier (-1: unbounded)", labels=["tier"]
        )
        resident = GaugeMetricFamily("care_router_cache_resident_bytes", "Router bytes resident", labels=["tier"])
        routers = GaugeMetricFamily("care_router_cache_resident_routers", "Task routers resident", labels=["tier"])
        evictions = CounterMetricFamily(
            "care_router_cache_evictions", "Routers evicted by capacity pressure", labels=["tier"]
        )
        for tier, tier_stats in (("device", stats.device), ("host", stats.host)):
            cap = tier_stats.capacity_bytes
            capacity.add_metric([tier], -1 if cap is None else cap)
            resident.add_metric([tier], tier_stats.resident_bytes)
            routers.add_metric([tier], tier_stats.entries)
            evictions.add_metric([tier], tier_stats.evictions)
        lookups = CounterMetricFamily("care_router_cache_lookups", "Router cache lookups", labels=["result"])
        lookups.add_metric(["hit"], stats.hits)
        lookups.add_metric(["miss"], stats.misses)
        yield from (capacity, resident, routers, evictions, lookups)

        try:
            jobs = self._jobs()
        except Exception:  # a scrape must not fail because the job database is busy
            logger.warning("could not read the job store for metrics", exc_info=True)
            return
        tasks = GaugeMetricFamily("care_tasks", "Tasks by status", labels=["status"])
        for status, count in sorted(jobs.counts.items()):
            tasks.add_metric([status], count)
        yield tasks
        yield _histogram(
            "care_training_seconds", "Wall time of finished trainings", jobs.training_seconds, TRAINING_BUCKETS
        )


class _DataDirCollector(Collector):
    """care_data_dir_bytes{kind}: disk usage of the data directory, measured by the housekeeper."""

    def __init__(self, usage: Callable[[], Mapping[str, int]]) -> None:
        self._usage = usage

    def collect(self) -> Iterable[Metric]:
        try:
            usage = self._usage()
        except Exception:  # a scrape must not fail because a directory vanished under the walk
            logger.warning("could not measure the data directory for metrics", exc_info=True)
            return
        family = GaugeMetricFamily(
            "care_data_dir_bytes",
            "Bytes on disk under the data directory (registry|uploads|staging|jobs_db)",
            labels=["kind"],
        )
        for kind, size in sorted(usage.items()):
            family.add_metric([kind], size)
        yield family


def _histogram(name: str, documentation: str, values: Sequence[float], buckets: Sequence[float]) -> Metric:
    family = HistogramMetricFamily(name, documentation)
    cumulative = [(str(bound), sum(1 for v in values if v <= bound)) for bound in buckets]
    cumulative.append(("+Inf", len(values)))
    family.add_metric([], cumulative, sum_value=float(sum(values)))
    return family


class Metrics:
    """The server's Prometheus objects."""

    def __init__(self, cache_stats: Callable[[], CacheStats], jobs: Callable[[], JobSnapshot]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.router_load_seconds = Histogram(
            "care_router_load_seconds",
            "Time to bring one task's routers into the device tier",
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.model_version = Gauge("care_model_version", "Served model version (0: none)", registry=registry)
        self.tasks_learned = Gauge("care_tasks_learned", "Tasks in the served version", registry=registry)
        self.classes_learned = Gauge("care_classes_learned", "Classes in the served version", registry=registry)
        self.classes_provisional = Gauge(
            "care_classes_provisional",
            "Classes of the served version that are provisional (closed-form head, not trained yet)",
            registry=registry,
        )
        self.servable_seconds = Histogram(
            "care_task_servable_seconds",
            "Time from a task's 202 to this server first answering with its classes (provisional or trained)",
            buckets=SERVABLE_BUCKETS,
            registry=registry,
        )
        self.predict_requests = Counter(
            "care_predict_requests", "Predict requests by HTTP status", ["code"], registry=registry
        )
        self.predict_latency = Histogram(
            "care_predict_latency_seconds", "Predict request latency", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.batch_size = Histogram(
            "care_batch_size", "Images per inference batch", buckets=BATCH_BUCKETS, registry=registry
        )
        self.batch_inference_seconds = Histogram(
            "care_batch_inference_seconds",
            "Model time of one inference batch (preprocessed images in, probabilities out): a request's latency less "
            "this is its decoding, queueing and HTTP",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_images = Gauge("care_predict_queue_images", "Images waiting for inference", registry=registry)
        self.version_load_seconds = Histogram(
            "care_version_load_seconds",
            "Time to load a newly published version beside the served one",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.version_load_failures = Counter(
            "care_version_load_failures", "Published versions refused (corrupt or incompatible)", registry=registry
        )
        registry.register(_StateCollector(cache_stats, jobs))

    def record_batch(self, images: int, seconds: float) -> None:
        """One inference batch: its size and its model time."""
        self.batch_size.observe(images)
        self.batch_inference_seconds.observe(seconds)

    def watch_data_dir(self, usage: Callable[[], Mapping[str, int]]) -> None:
        """Export ``care_data_dir_bytes{kind}`` from ``usage`` (bytes by kind), called at scrape time."""
        self.registry.register(_DataDirCollector(usage))

    def record_router_load(self, seconds: float, source: str) -> None:  # noqa: ARG002 - the cache hook's signature
        self.router_load_seconds.observe(seconds)
