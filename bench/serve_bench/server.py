"""The servers `care-bench serve` measures: `care-serve serve` processes on loopback ports, and what their /metrics
say over a window."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.serve_bench.rows import WindowStats
from service.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command() -> list[str]:
    """`care-serve` next to this interpreter (a virtualenv's script), else the module."""
    script = Path(sys.executable).with_name("care-serve")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]


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
        )


def window_stats(before: MetricsSnapshot, after: MetricsSnapshot) -> WindowStats:
    """Batch sizes, router cache hit ratio and resident bytes over the window between two snapshots."""
    batches = after.batch_count - before.batch_count
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
        "router_lookups": int(lookups),
        "hit_ratio": round((after.hits - before.hits) / lookups, 4) if lookups else math.nan,
        "evictions": int(after.evictions - before.evictions),
        "router_resident_bytes": int(after.resident_bytes),
        "routers_resident": int(after.resident_routers),
    }


class ServerProcess:
    """One `care-serve serve` on a loopback port, in its own session so it can always be stopped.

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
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARE_")}
        env.update(settings.environment())
        env.update({"HF_HUB_OFFLINE": "1", "CARE_PORT": str(self.port), "CARE_HOST": "127.0.0.1"})
        self.log = log_dir / f"{name}.log"
        argv = [
            *server_command(),
            "serve",
            *([] if worker else ["--no-worker"]),
            "--port",
            str(self.port),
            "--data-dir",
            str(settings.data_dir),
        ]
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _wait(self, what: str, probe: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                if probe():
                    return
            time.sleep(0.05)
        raise TimeoutError(f"server {self.name}: no {what} after {timeout_s:.0f} s:\n{self.tail()}")

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        self._wait("readiness", lambda: httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200, timeout_s)

    def model(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.url}/model", timeout=10).json()
        return answer

    def wait_version(self, version: int, timeout_s: float = 600.0) -> None:
        self._wait(f"version {version}", lambda: (self.model()["model_version"] or 0) >= version, timeout_s)

    def metrics(self) -> MetricsSnapshot:
        return MetricsSnapshot.parse(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux; 0 elsewhere)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)  # its own session: only this server
                self.popen.wait(10)
