"""`care-bench accuracy` on a tiny stream: every method learns, metrics and plots are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.accuracy import METHOD_NAMES, PRESETS, Preset, markdown_table, run, write_report
from bench.cli import _train_options, build_parser
from model.config import TrainConfig


def test_accuracy_bench_runs_every_method_on_a_tiny_stream(tmp_path: Path) -> None:
    preset = Preset(
        "digits5",
        backbone="test_vit",
        image_size=32,
        train_per_class=8,
        test_per_class=4,
        num_tasks=2,
        train=TrainConfig(epochs=1, batch_size=8, align_epochs=1, align_samples_per_class=4, min_steps=2),
        ranpac_dim=64,
    )
    progress: list[int] = []
    checkpoints: list[dict[str, Any]] = []
    result = run(
        preset,
        list(METHOD_NAMES),
        lambda done, total, _: progress.append(done),
        checkpoints.append,
        checkpoint_every=1,
    )

    assert progress == [1, 2] and result["stream"] == {"name": "digits5", "tasks": 2, "classes": 4}
    # One checkpoint after the first task (the last one is the result itself), marked incomplete.
    assert [(c["complete"], c["tasks_done"]) for c in checkpoints] == [(False, 1)]
    assert all(len(m["accuracy"]["stages"]) == 1 for m in checkpoints[0]["methods"].values())
    assert result["complete"] and result["tasks_done"] == 2
    for name, method in result["methods"].items():
        stages = method["accuracy"]["stages"]
        assert len(stages) == 2, name
        assert all(0.0 <= stage["overall"] <= 1.0 for stage in stages), name
        summary = method["accuracy"]["summary"]
        assert summary["last_accuracy"] == stages[-1]["overall"], name
        assert method["learn_seconds"] >= 0 and method["peak_rss_bytes"] > 0, name  # SimpleCIL rounds to 0.0 s
    assert result["served_method"] == "served" and result["model_config"]["head"] == "analytic"
    assert set(result["methods"]) == set(METHOD_NAMES)
    for care in ("served", "care-reference", "care-m1"):
        assert result["methods"][care]["learn_seconds"] > 0
        assert len(result["methods"][care]["task_train_seconds"]) == 2
        # Trained experts move the features (a zero change would mean they are inert), one value per site.
        method = result["methods"][care]
        assert len(method["expert_scale_abs_mean"]) == len(method["site_input_change"]) > 1
        assert method["feature_change"] > 0 and method["site_input_change"][-1] > 0
    # The frozen head keeps its statistics: a D' x D' Gram matrix of float64 (test_vit: phi and every block, 64 each).
    assert result["methods"]["head-frozen"]["state_bytes"] >= 8 * (2 * 64) ** 2
    assert len(result["methods"]["ranpac"]["selected_ridges"]) == 2
    # First-session adaptation: the first task's experts at scale 1; "+frozen" reads both inputs (a 4x Gram matrix).
    first, both = result["methods"]["first-session"], result["methods"]["first-session+frozen"]
    assert first["first_scale"] == both["first_scale"] == 1.0
    assert (first["with_frozen"], both["with_frozen"]) == (False, True)
    assert both["state_bytes"] > 3 * first["state_bytes"]
    # Nearest-prototype on the classes it has seen: at least the first task's own test images are not all wrong.
    assert result["methods"]["simplecil"]["accuracy"]["stages"][0]["overall"] > 0.5

    path = write_report(result, tmp_path, {"command": "test"})
    assert json.loads(path.read_text())["meta"] == {"command": "test"}
    assert (tmp_path / "accuracy_digits5.png").stat().st_size > 0
    assert markdown_table(result).count("\n") == 1 + len(METHOD_NAMES)
    partial = write_report(checkpoints[0], tmp_path / "partial", {"command": "test"})
    assert json.loads(partial.read_text())["complete"] is False and partial.with_suffix(".png").stat().st_size > 0


def test_train_options_parse_as_the_field_types() -> None:
    train = PRESETS["fmnist5"].train_config()
    assert _train_options(train, ["covariance=diagonal", "align_epochs=10", "lr=0.005"]) == {
        "covariance": "diagonal",
        "align_epochs": 10,
        "lr": 0.005,
    }
    assert _train_options(train, ["ridge_ratio=0.3", "old_class_negatives=false", "expert_scale_init=1"]) == {
        "ridge_ratio": 0.3,
        "old_class_negatives": False,
        "expert_scale_init": 1.0,
    }
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        _train_options(train, ["no_such_field=1"])
    args = build_parser().parse_args(["accuracy", "--train-option", "covariance=diagonal"])
    assert args.train_option == ["covariance=diagonal"]


def test_presets_run_what_the_worker_serves_by_default() -> None:
    from service.settings import Settings

    for preset in PRESETS.values():
        if preset.stream == "glyphs-tiny":
            continue
        assert preset.model_config() == Settings().model()
        assert preset.train_config() == Settings().training()


def test_accuracy_bench_runs_moram_and_seta_on_a_tiny_stream() -> None:
    """`care-bench accuracy --methods moram,seta,seta-unanchored`: their trainers and served heads (issue 15)."""
    assert build_parser().parse_args(["accuracy", "--methods", "moram"]).methods.split(",") == ["moram"]
    preset = Preset(
        "digits5",
        backbone="test_vit",
        image_size=32,
        train_per_class=8,
        test_per_class=4,
        num_tasks=2,
        train=TrainConfig(epochs=1, batch_size=8, min_steps=2),
    )
    result = run(preset, ["moram", "seta", "seta-unanchored", "simplecil"])
    moram = result["methods"]["moram"]
    stages = moram["accuracy"]["stages"]
    assert len(stages) == 2 and all(0.0 <= stage["overall"] <= 1.0 for stage in stages)
    assert len(moram["task_train_seconds"]) == 2 and moram["learn_seconds"] > 0
    # Every task adds moram_rank atoms at every site; the recorded settings are MoRAM's defaults.
    assert moram["moram_config"]["moram_rank"] == 16 and moram["atoms_per_site"] == 2 * 16
    assert moram["state_bytes"] > 0
    # Its own first task's test images are not all wrong (4 classes, chance 0.25 after two tasks).
    assert stages[0]["overall"] > 0.5
    # SETA: the shared experts' drift per task (none at the first) and its settings; the ablation has no anchor.
    seta, loose = result["methods"]["seta"], result["methods"]["seta-unanchored"]
    assert seta["shared_drift"][0] == 0.0 and seta["shared_drift"][1] > 0 and seta["state_bytes"] > 0
    assert seta["seta_config"]["seta_anchor"] > 0 and loose["seta_config"]["seta_anchor"] == 0.0
    assert len(seta["accuracy"]["stages"]) == 2 and seta["accuracy"]["stages"][0]["overall"] > 0.5
