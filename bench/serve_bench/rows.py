"""The rows `care-bench serve` writes to serve_bench.json, typed. They are dicts (TypedDicts) built in the order of
the JSON's keys, so the file keeps its shape: docs/bench/serve_bench.json is the reference, and
tests/e2e/bench/test_serve_bench.py compares a tiny run's keys with it."""

from __future__ import annotations

from typing import NotRequired, TypedDict, final


class RequestStats(TypedDict):
    """Requests sent and answered within a window (`clients.summarize`)."""

    requests: int
    failed: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float
    requests_per_s: float


class WindowStats(TypedDict):
    """The server's batches and router cache over a window, from two /metrics snapshots (`server.window_stats`)."""

    batches: int
    mean_batch_size: float
    batch_size_histogram: dict[str, int]
    server_model_ms: float  # mean model time per batch inside the server (care_batch_inference_seconds)
    router_lookups: int
    hit_ratio: float
    evictions: int
    router_resident_bytes: int
    routers_resident: int


class LatencyRow(RequestStats, WindowStats):
    """One task count: one client's requests of B images, and the offline paths on the same images."""

    tasks: int
    batch: int
    server_rss_bytes: int
    backbone_ms: float
    fast_ms: float
    reference_ms: float
    paired_p50_over_backbone: float
    offline_samples: int
    own_task_routing: float
    p50_over_backbone: float
    fast_over_backbone: float
    server_model_over_backbone: float  # the model's time per batch in the server over the backbone alone offline
    unfolded_backbone_ms: float  # timm's backbone as built (batch norms not folded), offline
    p50_over_unfolded_backbone: float
    reference_over_fast: float
    # The minimal baseline server (bench/serve_bench/baseline.py): the same request bodies, alternated with the
    # server's in the same window.
    baseline_requests: int
    baseline_failed: int
    baseline_p50_ms: float
    baseline_p95_ms: float
    baseline_rss_bytes: int
    p50_over_baseline: float
    paired_p50_over_baseline: float


class ThroughputRow(RequestStats, WindowStats):
    """One concurrency: closed-loop clients at the largest task count."""

    tasks: int
    concurrency: int
    images_per_request: int
    server_rss_bytes: int
    # The minimal baseline server at the same concurrency, in a window right after the server's.
    baseline_images_per_s: float
    baseline_p50_ms: float
    baseline_p99_ms: float
    baseline_failed: int
    images_per_s_over_baseline: float


class CapSide(RequestStats, WindowStats):
    """One of the two servers of a cap row (capped or uncapped)."""

    server_rss_bytes: int


class CapRow(TypedDict):
    """One cap: the same skewed requests alternated between a capped and the uncapped server."""

    cap_fraction: float
    cap_bytes: int
    router_bytes_total: int
    mix: str
    uncapped: CapSide
    capped: CapSide
    p50_ratio: float
    paired_ratio: float


class CapResult(TypedDict):
    router_bytes_total: NotRequired[int]  # absent when no cap was measured
    rows: list[CapRow]


class HotloadVersion(TypedDict):
    """One version published under load."""

    version: int
    tasks: int
    publish_ms: float
    to_first_response_ms: float


class HotloadResult(RequestStats):
    """Clients predicting while versions are published one at a time."""

    clients: int
    publishes: int
    poll_interval_s: float
    to_first_response_p50_ms: float
    to_first_response_max_ms: float
    version_load_mean_ms: float
    server_rss_bytes: int
    versions: list[HotloadVersion]


@final
class Skipped(TypedDict):
    """A phase that was not run (written as {}). Final: `"publishes" in hotload` tells the two apart."""


class Target(TypedDict):
    """A target of issue 6: its number, its limit and whether it is met (None: not measured)."""

    target: str
    value: float | None
    limit: float
    at_most: bool
    met: bool | None
    detail: str


class Measurements(TypedDict):
    """What the phases measured."""

    latency: list[LatencyRow]
    backbone_images_per_s: dict[str, float]
    backbone_images_per_s_after: dict[str, float]
    throughput: list[ThroughputRow]
    cap: CapResult
    hotload: HotloadResult | Skipped


class ServeBenchResult(Measurements):
    """serve_bench.json without its "meta": the measurements, the configuration as run, the targets."""

    config: dict[str, object]
    targets: list[Target]
