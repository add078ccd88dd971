"""`care-bench model` and `care-bench registry` end to end on tiny settings: each writes its JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main


def test_model_bench_times_every_path_for_each_task_count(tmp_path: Path) -> None:
    argv = ["model", "--backbones", "test_vit", "--tasks", "1,2", "--repeats", "1", "--batch-vit", "2"]
    argv += ["--methods", "moram,seta"]
    assert main([*argv, "--image-size", "32", "--threads", "1", "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "model_bench.json").read_text())
    assert report["meta"]["machine"] and [row["tasks"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["backbone_s"] > 0 and row["fast_s"] > 0 and row["reference_s"] > 0, row
        assert row["served_s"] > 0 and 0 < row["head_s"] < row["served_s"] and row["classes"] == 3 * row["tasks"], row
        # The other methods' served calls, timed in the same repeats (MoRAM in both its forms).
        assert set(row["method_s"]) == {"moram", "moram-bounded", "seta"} and min(row["method_s"].values()) > 0, row
    assert (tmp_path / "model_bench.png").stat().st_size > 0
    assert (tmp_path / "model_bench_methods.png").stat().st_size > 0


def test_registry_bench_reports_loads_and_latency_per_cap(tmp_path: Path) -> None:
    argv = ["registry", "--tasks", "3", "--batches", "1", "--batch", "2", "--image-size", "32"]
    assert main([*argv, "--caps", "none,0.5", "--threads", "1", "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "registry_bench.json").read_text())
    # Tasks 10 and 100 are left out of a 3-task registry; the last task's router scores the most experts.
    loads = report["router_loads"]
    assert [row["task"] for row in loads] == [1, 3] and loads[0]["bytes"] < loads[1]["bytes"]
    rows = {(row["mix"], row["cap_fraction"]) for row in report["latency"]}
    assert rows == {(mix, cap) for mix in ("skewed", "uniform") for cap in (None, 0.5)}
    assert all(row["max_resident_bytes"] <= row["cap_bytes"] for row in report["latency"] if row["cap_bytes"])
    # Serving the registry from nothing, and hot-loading the next version (one task more) beside it.
    assert report["cold_load_seconds"] > 0 and report["next_version_load_seconds"] > 0


def test_registry_bench_refuses_a_cap_smaller_than_one_task(tmp_path: Path) -> None:
    argv = ["registry", "--tasks", "3", "--batches", "1", "--batch", "2", "--image-size", "32"]
    with pytest.raises(SystemExit, match=r"--caps: caps \[0.05\] .* use caps of at least 0.50"):
        main([*argv, "--caps", "none,0.05", "--threads", "1", "--out", str(tmp_path)])
    assert not (tmp_path / "registry_bench.json").exists()
