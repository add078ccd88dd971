"""What `care-bench serve` reports: the targets of issues 6 and 17 met or not, serve_bench.json, three plots and the
markdown tables of docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.report import write_json
from bench.serve_bench.config import (
    TARGET_CAP_FRACTION,
    TARGET_CAP_P50_RATIO,
    TARGET_LATENCY_MAX_OVER_10,
    TARGET_LATENCY_OVER_BACKBONE,
    TARGET_LATENCY_OVER_BASELINE,
    TARGET_REFERENCE_OVER_FAST,
    TARGET_THROUGHPUT_OVER_BACKBONE,
)
from bench.serve_bench.rows import ServeBenchResult, Target


def targets(result: ServeBenchResult) -> list[Target]:
    """Each target of issues 6 and 17 with its number and whether it is met (None: not measured in this run)."""
    latency = {row["tasks"]: row for row in result["latency"]}
    largest = max(latency)
    out: list[Target] = []

    def add(name: str, value: float | None, limit: float, at_most: bool, detail: str) -> None:
        met = None if value is None or math.isnan(value) else (value <= limit if at_most else value >= limit)
        out.append({"target": name, "value": value, "limit": limit, "at_most": at_most, "met": met, "detail": detail})

    row = latency[largest]
    add(
        f"p50 at {largest} tasks / backbone alone (batch {row['batch']})",
        row["p50_over_backbone"],
        TARGET_LATENCY_OVER_BACKBONE,
        True,
        f"{row['p50_ms']} ms / {row['backbone_ms']} ms (paired {row['paired_p50_over_backbone']}x)",
    )
    add(
        f"p50 at {largest} tasks / minimal baseline server p50 (batch {row['batch']})",
        row["p50_over_baseline"],
        TARGET_LATENCY_OVER_BASELINE,
        True,
        f"{row['p50_ms']} ms / {row['baseline_p50_ms']} ms (paired {row['paired_p50_over_baseline']}x)",
    )
    if 10 in latency and largest != 10:
        ratio = round(row["p50_ms"] / latency[10]["p50_ms"], 3)
        add(
            f"p50 at {largest} tasks / p50 at 10 tasks",
            ratio,
            TARGET_LATENCY_MAX_OVER_10,
            True,
            f"{row['p50_ms']} ms / {latency[10]['p50_ms']} ms",
        )
    add(
        f"reference / fast path at {largest} tasks (offline, batch {row['batch']})",
        row["reference_over_fast"],
        TARGET_REFERENCE_OVER_FAST,
        False,
        f"{row['reference_ms']} ms / {row['fast_ms']} ms",
    )
    if result["throughput"]:
        best = max(result["throughput"], key=lambda r: r["images_per_s"])
        batch = str(result["config"]["max_batch_size"])
        offline = statistics.fmean(
            [result["backbone_images_per_s"][batch], result["backbone_images_per_s_after"][batch]]
        )
        add(
            f"peak throughput at {best['tasks']} tasks / backbone alone at batch {batch}",
            round(best["images_per_s"] / offline, 3),
            TARGET_THROUGHPUT_OVER_BACKBONE,
            False,
            f"{best['images_per_s']} images/s ({best['concurrency']} clients) / {offline:.1f} images/s; minimal "
            f"baseline server at {best['concurrency']} clients {best['baseline_images_per_s']} images/s "
            f"({best['images_per_s_over_baseline']}x)",
        )
    for cap in result["cap"]["rows"]:
        if math.isclose(cap["cap_fraction"], TARGET_CAP_FRACTION):
            add(
                f"p50 with the router cap at {cap['cap_fraction']:.0%}, skewed mix / uncapped",
                cap["p50_ratio"],
                TARGET_CAP_P50_RATIO,
                True,
                f"{cap['capped']['p50_ms']} ms / {cap['uncapped']['p50_ms']} ms (paired {cap['paired_ratio']}x), "
                f"hit ratio {cap['capped']['hit_ratio']}",
            )
    hot = result["hotload"]
    if "publishes" in hot:
        add(
            f"failed requests over {hot['publishes']} publishes under load",
            hot["failed"],
            0,
            True,
            f"publish -> first response p50 {hot['to_first_response_p50_ms']} ms, max {hot['to_first_response_max_ms']}"
            " ms",
        )
    return out


def write_report(result: ServeBenchResult, out_dir: Path, meta: dict[str, object]) -> Path:
    """JSON of the raw numbers and a PNG plot of each phase that ran (latency, throughput, cache); returns the JSON
    path."""
    path = write_json(out_dir, "serve_bench.json", meta, dict(result))
    ran = {"latency": bool(result["latency"]), "throughput": bool(result["throughput"]), "cache": True}
    for name, plot in _plots().items():
        if ran[name]:
            plot(result, out_dir / f"serve_bench_{name}.png")
    return path


def _plots() -> dict[str, Callable[[ServeBenchResult, Path], None]]:
    return {"latency": _plot_latency, "throughput": _plot_throughput, "cache": _plot_cache}


@contextlib.contextmanager
def _figure(path: Path) -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    yield axis
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_latency(result: ServeBenchResult, path: Path) -> None:
    rows = result["latency"]
    tasks = [r["tasks"] for r in rows]
    with _figure(path) as axis:
        axis.plot(tasks, [r["p50_ms"] for r in rows], "o-", label="server p50 (HTTP, decode, batch)")
        axis.fill_between(
            tasks, [r["p50_ms"] for r in rows], [r["p95_ms"] for r in rows], alpha=0.2, label="server p50..p95"
        )
        axis.plot(tasks, [r["fast_ms"] for r in rows], "^-", label="fast path (offline)")
        axis.plot(tasks, [r["reference_ms"] for r in rows], "s-", label="reference path (offline)")
        axis.plot(tasks, [r["backbone_ms"] for r in rows], "k--", label="backbone alone (offline)")
        axis.plot(tasks, [r["baseline_p50_ms"] for r in rows], "x:", label="minimal baseline server p50")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("tasks learned")
        axis.set_ylabel(f"ms per request of {rows[0]['batch']} images")
        axis.set_title("latency against the number of tasks")
        axis.legend(fontsize=8)


def _plot_throughput(result: ServeBenchResult, path: Path) -> None:
    rows = result["throughput"]
    with _figure(path) as axis:
        if rows:
            clients = [r["concurrency"] for r in rows]
            axis.plot(clients, [r["images_per_s"] for r in rows], "o-", label=f"server, {rows[0]['tasks']} tasks")
            axis.plot(clients, [r["baseline_images_per_s"] for r in rows], "x:", label="minimal baseline server")
            by_batch = result["backbone_images_per_s"]
            axis.plot(
                clients, [by_batch.get(str(c), math.nan) for c in clients], "k:", label="backbone alone, batch = C"
            )
            batch = str(result["config"]["max_batch_size"])
            best = by_batch[batch]
            axis.axhline(best, color="k", linestyle="--", label=f"backbone alone, batch {batch}")
            axis.axhline(0.8 * best, color="r", linestyle="--", linewidth=0.8, label="target: 0.8x of it")
            axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients (C)")
        axis.set_ylabel("images per second")
        axis.set_title("throughput against concurrency")
        axis.legend(fontsize=8)


def _plot_cache(result: ServeBenchResult, path: Path) -> None:
    rows = result["cap"]["rows"]
    with _figure(path) as axis:
        if rows:
            caps = [1.0] + [r["cap_fraction"] for r in rows]
            uncapped_hits = statistics.fmean(r["uncapped"]["hit_ratio"] for r in rows)
            hits = [uncapped_hits] + [r["capped"]["hit_ratio"] for r in rows]
            order = sorted(range(len(caps)), key=lambda i: caps[i])
            axis.plot([caps[i] for i in order], [hits[i] for i in order], "o-", label="hit ratio (skewed mix)")
            axis.set_xscale("log")
            axis.set_ylim(0, 1.05)
            twin = axis.twinx()
            ratios = [1.0] + [r["p50_ratio"] for r in rows]
            twin.plot([caps[i] for i in order], [ratios[i] for i in order], "s--", color="C1", label="p50 / uncapped")
            twin.set_ylabel("p50 / uncapped p50", color="C1")
            twin.legend(loc="lower right", fontsize=8)
        axis.set_xlabel("router cache cap (fraction of all router bytes; 1 = uncapped)")
        axis.set_ylabel("router cache hit ratio")
        axis.set_title("cache hit ratio against cap")
        axis.legend(loc="lower left", fontsize=8)


def markdown_tables(result: ServeBenchResult) -> str:
    lines = [
        "| tasks | batch | p50 (ms) | p95 (ms) | p99 (ms) | requests | failed | backbone alone (ms) | p50 / backbone "
        "| baseline server p50 (ms) | p50 / baseline | fast (ms) | model in the server (ms) | reference (ms) "
        "| reference / fast | mean batch | hit ratio | router bytes | server RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["latency"]:
        lines.append(
            f"| {r['tasks']} | {r['batch']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['requests']} | {r['failed']} | {r['backbone_ms']:.1f} | {r['p50_over_backbone']:.2f}x | "
            f"{r['baseline_p50_ms']:.1f} | {r['p50_over_baseline']:.2f}x | {r['fast_ms']:.1f} | "
            f"{r['server_model_ms']:.1f} | {r['reference_ms']:.1f} | {r['reference_over_fast']:.1f}x | "
            f"{r['mean_batch_size']} | {r['hit_ratio']} | "
            f"{r['router_resident_bytes']:,} | "
            f"{r['server_rss_bytes'] / 2**20:.0f} |"
        )
    if result["throughput"]:
        lines += [
            "",
            "| tasks | clients | images/s | backbone alone, batch = clients (images/s) | baseline server (images/s) "
            "| images/s / baseline | p50 (ms) | p95 (ms) | p99 (ms) | baseline server p50 (ms) | mean batch "
            "| hit ratio | failed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in result["throughput"]:
            alone = result["backbone_images_per_s"].get(str(t["concurrency"]), math.nan)
            lines.append(
                f"| {t['tasks']} | {t['concurrency']} | {t['images_per_s']:.1f} | {alone} | "
                f"{t['baseline_images_per_s']:.1f} | {t['images_per_s_over_baseline']:.2f}x | {t['p50_ms']:.1f} | "
                f"{t['p95_ms']:.1f} | {t['p99_ms']:.1f} | {t['baseline_p50_ms']:.1f} | {t['mean_batch_size']} | "
                f"{t['hit_ratio']} | {t['failed']} |"
            )
    if result["cap"]["rows"]:
        lines += [
            "",
            "| cap (of router bytes) | cap bytes | p50 capped (ms) | p50 uncapped (ms) | ratio | paired ratio "
            "| hit ratio capped | hit ratio uncapped | evictions | resident bytes capped |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["cap"]["rows"]:
            c, u = row["capped"], row["uncapped"]
            lines.append(
                f"| {row['cap_fraction']:.0%} | {row['cap_bytes']:,} | {c['p50_ms']:.1f} | {u['p50_ms']:.1f} | "
                f"{row['p50_ratio']:.2f}x | {row['paired_ratio']:.2f}x | {c['hit_ratio']} | {u['hit_ratio']} | "
                f"{c['evictions']} | {c['router_resident_bytes']:,} |"
            )
    h = result["hotload"]
    if "publishes" in h:
        lines += [
            "",
            "| publishes | clients | publish -> first response p50 (ms) | max (ms) | server load mean (ms) | requests "
            "| failed | p50 (ms) | p99 (ms) |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {h['publishes']} | {h['clients']} | {h['to_first_response_p50_ms']} | "
            f"{h['to_first_response_max_ms']} | {h['version_load_mean_ms']} | {h['requests']} | {h['failed']} | "
            f"{h['p50_ms']} | {h['p99_ms']} |",
        ]
    lines += ["", "| target | value | limit | met |", "|---|---|---|---|"]
    for target in result["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        limit = f"{'<=' if target['at_most'] else '>='} {target['limit']}"
        lines.append(f"| {target['target']} | {target['value']} ({target['detail']}) | {limit} | {verdict} |")
    return "\n".join(lines)
