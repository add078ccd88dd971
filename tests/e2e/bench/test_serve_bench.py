"""`care-bench serve` end to end on a tiny configuration: real server processes, every phase, no failures."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from bench.cli import build_parser, machine_description
from bench.harness import alive, children
from bench.serve_bench import (
    MetricsSnapshot,
    ServeBenchConfig,
    markdown_tables,
    percentile,
    run,
    window_stats,
    write_report,
)

REFERENCE = Path(__file__).resolve().parents[3] / "docs" / "bench" / "serve_bench.json"
# Dicts keyed by data (batch sizes, histogram buckets), not by name: their keys are not part of the shape.
DATA_KEYED = ("batch_size_histogram", "backbone_images_per_s", "backbone_images_per_s_after")
# Keys added since the reference was published (issue 17: the minimal baseline server, the model's time in the
# server): new keys only; every key of the reference keeps its name and its order.
ADDED = [
    ".latency[].baseline_requests",
    ".latency[].baseline_failed",
    ".latency[].baseline_p50_ms",
    ".latency[].baseline_p95_ms",
    ".latency[].baseline_rss_bytes",
    ".latency[].p50_over_baseline",
    ".latency[].paired_p50_over_baseline",
    ".throughput[].baseline_images_per_s",
    ".throughput[].baseline_p50_ms",
    ".throughput[].baseline_p99_ms",
    ".throughput[].baseline_failed",
    ".throughput[].images_per_s_over_baseline",
    # The model's time per batch inside the server (care_batch_inference_seconds), in every window.
    ".latency[].server_model_ms",
    ".latency[].server_model_over_backbone",
    ".latency[].unfolded_backbone_ms",
    ".latency[].p50_over_unfolded_backbone",
    ".throughput[].server_model_ms",
    ".cap.rows[].uncapped.server_model_ms",
    ".cap.rows[].capped.server_model_ms",
]


def key_paths(value: Any, path: str = "") -> list[str]:
    """Every key path of a JSON value in the order it first appears (list items merged; data-keyed dicts as *)."""
    seen: dict[str, None] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{path}.*" if path.rsplit(".", 1)[-1] in DATA_KEYED else f"{path}.{key}"
            seen.update(dict.fromkeys([name, *key_paths(item, name)]))
    elif isinstance(value, list):
        for item in value:
            seen.update(dict.fromkeys(key_paths(item, f"{path}[]")))
    return list(seen)


def test_percentile_interpolates() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_window_stats_are_deltas() -> None:
    text = """# TYPE care_batch_size histogram
care_batch_size_bucket{le="1.0"} %d
care_batch_size_bucket{le="16.0"} %d
care_batch_size_bucket{le="+Inf"} %d
care_batch_size_count %d
care_batch_size_sum %d
# TYPE care_router_cache_lookups counter
care_router_cache_lookups_total{result="hit"} %d
care_router_cache_lookups_total{result="miss"} %d
# TYPE care_batch_inference_seconds histogram
care_batch_inference_seconds_count %d
care_batch_inference_seconds_sum %f
"""
    before = MetricsSnapshot.parse(text % (1, 2, 2, 2, 17, 10, 10, 2, 0.5))
    after = MetricsSnapshot.parse(text % (1, 5, 5, 5, 65, 40, 20, 5, 1.1))
    stats = window_stats(before, after)
    assert stats["batches"] == 3
    assert stats["mean_batch_size"] == 16.0
    assert stats["batch_size_histogram"] == {"<=16.0": 3}
    assert stats["hit_ratio"] == 0.75
    assert stats["server_model_ms"] == 200.0  # (1.1 - 0.5) s over 3 batches


def test_cli_parses_the_serve_benchmark() -> None:
    args = build_parser().parse_args(["serve", "--quick", "--tasks", "1,3", "--caps", "0.1,0.05"])
    assert args.quick and args.tasks == [1, 3] and args.caps == "0.1,0.05"
    assert args.handler.__name__ == "_bench_serve"


def test_serve_bench_runs_every_phase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny backbone comes from the environment, as a user would choose it for the real command.
    monkeypatch.setenv("CARE_BACKBONE", "test_vit")
    monkeypatch.setenv("CARE_BACKBONE_WEIGHTS", "random")
    monkeypatch.setenv("CARE_IMAGE_SIZE", "32")
    config = ServeBenchConfig(
        tasks=(1, 3),
        batch=4,
        concurrency=(1, 2),
        caps=(0.5,),
        duration_s=1.0,
        throughput_duration_s=1.0,
        warmup_s=0.3,
        publishes=2,
        hotload_clients=2,
        reference_repeats=1,
        max_batch_size=4,
    )
    messages: list[str] = []
    result = run(config, messages.append)

    assert result["config"]["backbone"] == "test_vit" and result["config"]["image_size"] == 32
    assert [row["tasks"] for row in result["latency"]] == [1, 3]
    for row in result["latency"]:
        assert row["failed"] == 0 and row["requests"] > 0
        assert row["mean_batch_size"] == 4.0  # one request of max-batch-size images is exactly one batch
        assert min(row["backbone_ms"], row["fast_ms"], row["reference_ms"]) > 0
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert 0 <= row["hit_ratio"] <= 1 and row["router_resident_bytes"] > 0 and row["server_rss_bytes"] > 0
        # The minimal baseline server, on the same bodies in the same window.
        assert row["baseline_failed"] == 0 and row["baseline_requests"] > 0 and row["baseline_rss_bytes"] > 0
        assert 0 < row["baseline_p50_ms"] <= row["baseline_p95_ms"]
        assert row["p50_over_baseline"] == round(row["p50_ms"] / row["baseline_p50_ms"], 3)
        assert row["paired_p50_over_baseline"] > 0
        # The server's own count of the model's time: inside each request's latency, so below its slowest one.
        assert 0 < row["server_model_ms"] < row["p99_ms"] * 1.01 + 1
    assert [row["concurrency"] for row in result["throughput"]] == [1, 2]
    assert all(row["failed"] == 0 and row["images_per_s"] > 0 for row in result["throughput"])
    for row in result["throughput"]:
        assert row["baseline_failed"] == 0 and row["baseline_images_per_s"] > 0 and row["baseline_p50_ms"] > 0
        assert row["images_per_s_over_baseline"] == round(row["images_per_s"] / row["baseline_images_per_s"], 3)
    assert set(result["backbone_images_per_s"]) == {"1", "2", "4"}
    (cap,) = result["cap"]["rows"]
    assert cap["cap_bytes"] == int(0.5 * result["cap"]["router_bytes_total"])
    assert cap["capped"]["failed"] == 0 and cap["uncapped"]["failed"] == 0
    assert cap["capped"]["router_resident_bytes"] <= cap["cap_bytes"] < cap["uncapped"]["router_resident_bytes"]
    hot = result["hotload"]
    assert hot["publishes"] == 2 and hot["failed"] == 0 and hot["requests"] > 0
    assert [v["tasks"] for v in hot["versions"]] == [4, 5]
    assert all(0 < v["to_first_response_ms"] < 60_000 for v in hot["versions"])
    verdicts = {t["target"]: t["met"] for t in result["targets"]}
    assert verdicts["failed requests over 2 publishes under load"] is True
    assert verdicts["p50 at 3 tasks / minimal baseline server p50 (batch 4)"] is not None
    assert len(verdicts) == 5  # no 10-task row and no 10 % cap in this run: those targets are left out

    path = write_report(result, tmp_path, machine_description())
    # The JSON keeps the shape of the published reference: its keys, in the same order, and only the added ones.
    written = key_paths(json.loads(path.read_text()))
    reference = key_paths(json.loads(REFERENCE.read_text()))
    assert [key for key in written if key not in ADDED] == reference
    assert sorted(set(written) - set(reference)) == sorted(ADDED)
    for name in ("latency", "throughput", "cache"):
        assert (tmp_path / f"serve_bench_{name}.png").stat().st_size > 0
    tables = markdown_tables(result)
    assert "| target | value | limit | met |" in tables and "| p50 / baseline |" in tables
    # Every server the benchmark started has been stopped.
    assert not [pid for pid in children(os.getpid()) if alive(pid)]
