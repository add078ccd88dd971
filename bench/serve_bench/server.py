"""The servers `care-bench serve` measures: `care-serve serve` processes on loopback ports, what their /metrics say
over a window, and the minimal baseline server (`bench.serve_bench.baseline`) in a process of its own."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import care_serve_argv, clean_env, free_port, rss_bytes, start
from bench.serve_bench.rows import WindowStats
from service.settings import Settings


@dataclass(frozen=True)
class MetricsSnapshot:
    """The /metrics series the benchmark reads (cumulative counters; subtract two snapshots for a window)."""

    batch_count: float
    batch_sum: float
    batch_buckets: dict[str, float]
    hits: float
    misses: float
    evictions: float
    resident_bytes: float
    resident_routers: float
    version_loads: float
    version_load_seconds: float
    inference_count: float = 0.0
    inference_seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> MetricsSnapshot:
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)

        def get(name: str, **labels: str) -> float:
            return values.get((name, tuple(sorted(labels.items()))), 0.0)

        buckets = {dict(key[1])["le"]: value for key, value in values.items() if key[0] == "care_batch_size_bucket"}
        return cls(
            batch_count=get("care_batch_size_count"),
            batch_sum=get("care_batch_size_sum"),
            batch_buckets=buckets,
            hits=get("care_router_cache_lookups_total", result="hit"),
            misses=get("care_router_cache_lookups_total", result="miss"),
            evictions=get("care_router_cache_evictions_total", tier="device"),
            resident_bytes=get("care_router_cache_resident_bytes", tier="device"),
            resident_routers=get("care_router_cache_resident_routers", tier="device"),
            version_loads=get("care_version_load_seconds_count"),
            version_load_seconds=get("care_version_load_seconds_sum"),
            inference_count=get("care_batch_inference_seconds_count"),
            inference_seconds=get("care_batch_inference_seconds_sum"),
        )


def window_stats(before: MetricsSnapshot, after: MetricsSnapshot) -> WindowStats:
    """Batch sizes, the model's mean time per batch in the server, router cache hit ratio and resident bytes over the
    window between two snapshots."""
    batches = after.batch_count - before.batch_count
    inferences = after.inference_count - before.inference_count
    inference_seconds = after.inference_seconds - before.inference_seconds
    lookups = (after.hits - before.hits) + (after.misses - before.misses)
    previous = 0.0
    histogram: dict[str, int] = {}
    for bound, cumulative in sorted(after.batch_buckets.items(), key=lambda item: float(item[0])):
        count = cumulative - before.batch_buckets.get(bound, 0.0)
        histogram[f"<={bound}"] = int(count - previous)
        previous = count
    return {
        "batches": int(batches),
        "mean_batch_size": round((after.batch_sum - before.batch_sum) / batches, 2) if batches else math.nan,
        "batch_size_histogram": {k: v for k, v in histogram.items() if v},
        "server_model_ms": round(1000 * inference_seconds / inferences, 2) if inferences else math.nan,
        "router_lookups": int(lookups),
        "hit_ratio": round((after.hits - before.hits) / lookups, 4) if lookups else math.nan,
        "evictions": int(after.evictions - before.evictions),
        "router_resident_bytes": int(after.resident_bytes),
        "routers_resident": int(after.resident_routers),
    }


class ServerProcess:
    """One `care-serve serve` on a loopback port (a `bench.harness.Process`, so it can always be stopped).

    Args:
        name: For logs.
        settings: The server's settings, passed as CARE_ variables.
        log_dir: Where its output goes.
        worker: Start the training worker too (the benchmarks of serving leave it out).
    """

    def __init__(self, name: str, settings: Settings, log_dir: Path, worker: bool = False) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = clean_env({**settings.environment(), "CARE_PORT": str(self.port), "CARE_HOST": "127.0.0.1"})
        argv = [
            *care_serve_argv(),
            "serve",
            *([] if worker else ["--no-worker"]),
            "--port",
            str(self.port),
            "--data-dir",
            str(settings.data_dir),
        ]
        self.process = start(name, argv, env, log_dir)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 30) -> str:
        return self.process.tail(lines)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        self.process.wait_ready(self.url, timeout_s, interval_s=0.05)

    def model(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.url}/model", timeout=10).json()
        return answer

    def wait_version(self, version: int, timeout_s: float = 600.0) -> None:
        def served() -> bool | None:
            return True if (self.model()["model_version"] or 0) >= version else None

        self.process.wait(f"{self.name} to serve version {version}", served, timeout_s, interval_s=0.05)

    def metrics(self) -> MetricsSnapshot:
        return MetricsSnapshot.parse(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux; 0 elsewhere)."""
        return rss_bytes(self.pid)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.process.stop(timeout_s)


class BaselineProcess:
    """The minimal FastAPI baseline (`python -m bench.serve_bench.baseline`) on a loopback port, started with the
    care-serve servers' CARE_ variables: the same backbone, weights, image size, device and torch threads."""

    def __init__(self, settings: Settings, log_dir: Path, name: str = "baseline") -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "bench.serve_bench.baseline", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = start(name, argv, clean_env(settings.environment()), log_dir)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        self.process.wait_ready(self.url, timeout_s, interval_s=0.05)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.process.stop(timeout_s)
