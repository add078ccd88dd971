"""What `care-bench serve` measures (`ServeBenchConfig`, `--quick`'s settings), the targets of issue 6, and the
servers' settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.settings import Settings

CPU = torch.device("cpu")
# Target thresholds of issue 6, checked by `targets`.
TARGET_LATENCY_OVER_BACKBONE = 1.3
TARGET_LATENCY_MAX_OVER_10 = 1.15
TARGET_REFERENCE_OVER_FAST = 5.0
TARGET_THROUGHPUT_OVER_BACKBONE = 0.8
TARGET_CAP_FRACTION = 0.1
TARGET_CAP_P50_RATIO = 1.2
# Issue 17: care-serve's p50 against the minimal baseline server a user would write (bench/serve_bench/baseline.py).
TARGET_LATENCY_OVER_BASELINE = 1.1


@dataclass(frozen=True)
class ServeBenchConfig:
    """What `run` measures. Durations are per measured window; each window follows its own warm-up.

    Attributes:
        tasks: Task counts served in turn (published as versions of that many tasks, smallest first).
        batch: Images per request in the latency phase (default: the server's largest batch).
        concurrency: Client counts of the throughput phase.
        throughput_images: Images per request in the throughput and hot-load phases.
        caps: Router cache caps as fractions of all router bytes (cap phase; empty: skip it).
        duration_s: Measured seconds of each latency and cap window.
        throughput_duration_s: Measured seconds of each throughput window.
        warmup_s: Seconds of requests before each window, not measured.
        publishes: Versions published one task at a time in the hot-load phase (0: skip it).
        hotload_clients: Clients predicting during the hot-load phase.
        reference_repeats: Offline forward passes of the reference path per task count.
        threads: Torch threads of the server (CARE_SERVE_THREADS) and of this process's offline timings.
        max_batch_size: CARE_MAX_BATCH_SIZE of the servers.
        max_batch_wait_ms: CARE_MAX_BATCH_WAIT_MS of the servers.
        poll_interval_s: CARE_POLL_INTERVAL_S of the servers (part of the hot-load time).
        classes_per_task: Classes of every synthetic task.
        image_format: "png" or "jpeg": how the client encodes its images.
        top_k: The `top_k` of every request.
        backbone: timm name; None: CARE_BACKBONE or the default.
        backbone_weights: None: CARE_BACKBONE_WEIGHTS or the default (bundled where available).
        image_size: Input resolution; None: CARE_IMAGE_SIZE or the backbone's pretrained size.
        seed: Seeds the tasks, the images and the request mixes.
    """

    tasks: tuple[int, ...] = (1, 10, 100, 300)
    batch: int | None = None
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    throughput_images: int = 1
    caps: tuple[float, ...] = (0.25, 0.1, 0.05)
    duration_s: float = 30.0
    throughput_duration_s: float = 20.0
    warmup_s: float = 3.0
    publishes: int = 20
    hotload_clients: int = 4
    reference_repeats: int = 3
    threads: int = 2
    max_batch_size: int = 16
    max_batch_wait_ms: float = 5.0
    poll_interval_s: float = 0.1
    classes_per_task: int = 3
    image_format: str = "png"
    top_k: int = 5
    backbone: str | None = None
    backbone_weights: str | None = None
    image_size: int | None = None
    seed: int = 0

    @property
    def request_batch(self) -> int:
        return self.batch or self.max_batch_size


QUICK = {
    "tasks": (1, 10, 30),
    "concurrency": (1, 4),
    "caps": (0.1,),
    "duration_s": 4.0,
    "throughput_duration_s": 4.0,
    "warmup_s": 1.0,
    "publishes": 3,
    "reference_repeats": 1,
}


def bench_settings(config: ServeBenchConfig, data_dir: Path) -> Settings:
    """The servers' settings: CARE_ variables, with the benchmark's choices winning."""
    overrides: dict[str, Any] = {
        "data_dir": data_dir,
        "run_worker": False,
        "serve_threads": config.threads,
        "max_batch_size": config.max_batch_size,
        "max_batch_wait_ms": config.max_batch_wait_ms,
        "poll_interval_s": config.poll_interval_s,
        "router_cache_bytes": None,
        "router_host_cache_bytes": 0,
        "api_key": None,
        "log_level": "WARNING",
    }
    for name in ("backbone", "backbone_weights", "image_size"):
        if getattr(config, name) is not None:
            overrides[name] = getattr(config, name)
    return Settings(**overrides)
