"""Plot the methods side by side from `care-bench accuracy` results of one stream (issue 15).

`python -m bench.methods_plot --stream glyphs300 --out docs/bench/methods/methods_glyphs300.png
docs/bench/accuracy_glyphs300.json docs/bench/methods/seta_glyphs300.json docs/bench/methods/moram_glyphs300.json`
draws every method of every given result file (the stream must agree) as accuracy over all classes seen after each
task; `LABEL=path` draws only that file's first method, as LABEL. Accuracy is deterministic here, so runs of the same
preset made at different times can share one plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def curves(results: list[tuple[str | None, dict[str, Any]]]) -> dict[str, list[float]]:
    """Method name (or the file's label) -> accuracy (%) after each task, from (label, result) pairs of one stream."""
    streams = {r["stream"]["name"] for _, r in results}
    if len(streams) != 1:
        raise ValueError(f"results of several streams: {sorted(streams)}")
    found: dict[str, list[float]] = {}
    for label, result in results:
        methods = list(result["methods"].items())
        for name, method in methods[:1] if label else methods:
            found[label or name] = [100 * stage["overall"] for stage in method["accuracy"]["stages"]]
    return found


def _labelled(argument: str) -> tuple[str | None, dict[str, Any]]:
    label, _, path = argument.rpartition("=")
    return label or None, json.loads(Path(path).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="result JSON files, each optionally LABEL=path")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = curves([_labelled(argument) for argument in args.results])
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for name, values in found.items():
        axis.plot(range(1, len(values) + 1), values, "o-" if len(values) < 12 else "-", label=name, markersize=3)
    axis.set_xlabel("tasks learned")
    axis.set_ylabel("accuracy over every class seen (%)")
    axis.set_title(f"{args.stream}: methods side by side")
    axis.legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    plt.close(figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
