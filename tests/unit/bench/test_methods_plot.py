"""`python -m bench.methods_plot`: methods of several result files of one stream on one plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.methods_plot import curves, main


def result(stream: str, **methods: list[float]) -> dict[str, object]:
    return {
        "stream": {"name": stream},
        "methods": {
            name: {"accuracy": {"stages": [{"overall": value} for value in values]}} for name, values in methods.items()
        },
    }


def test_methods_of_several_files_share_one_plot_and_a_label_names_a_files_first_method(tmp_path: Path) -> None:
    served = tmp_path / "served.json"
    served.write_text(json.dumps(result("fmnist5", served=[0.9, 0.8], ranpac=[0.85, 0.7])))
    old = tmp_path / "old.json"
    old.write_text(json.dumps(result("fmnist5", moram=[0.9, 0.2], ranpac=[0.85, 0.7])))
    found = curves([(None, json.loads(served.read_text())), ("moram, old", json.loads(old.read_text()))])
    assert found == {"served": [90.0, 80.0], "ranpac": [85.0, 70.0], "moram, old": [90.0, 20.0]}
    out = tmp_path / "plot.png"
    assert main(["--stream", "fmnist5", "--out", str(out), str(served), f"moram, old={old}"]) == 0
    assert out.stat().st_size > 0


def test_results_of_different_streams_are_refused() -> None:
    with pytest.raises(ValueError, match="several streams"):
        curves([(None, result("fmnist5", a=[1.0])), (None, result("glyphs100", b=[1.0]))])
