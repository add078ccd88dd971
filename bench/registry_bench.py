"""`care-bench registry`: router loads, and batch latency under router caps and task mixes.

A registry of random-weight tasks is published to a temporary directory and served exactly as the server serves it
(`SnapshotLoader`, the byte-capped router cache). Random perceptrons route every input to the same few tasks, so
the tasks are *keyed* (`bench.synthetic.keyed_learned_tasks`): task t's perceptrons are most confident on
key image t, as trained ones are on their own classes, and a request "of task t" sends key image t. Batches draw
their tasks uniformly or with Zipf(1.1) popularity (ranks shuffled, so popularity is unrelated to task age).
"""

from __future__ import annotations

import logging
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.report import write_json
from bench.synthetic import key_images, populate
from model.backbone import build_backbone
from model.config import ModelConfig
from model.network import CareModel
from registry import Registry
from service.inference.snapshot import ServedVersion, SnapshotLoader
from service.modelstore import ModelStore
from service.routers.source import CachedRouters, new_router_cache

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")


@dataclass(frozen=True)
class LoadRow:
    task: int
    bytes: int
    first_ms: float
    median_ms: float


@dataclass(frozen=True)
class LatencyRow:
    cap_fraction: float | None
    cap_bytes: int | None
    mix: str
    batches: int
    p50_ms: float
    p95_ms: float
    hit_ratio: float
    evictions: int
    max_resident_bytes: int


def _served(store: ModelStore, version: int, cap: int | None) -> tuple[ServedVersion, Any]:
    cache = new_router_cache(CPU, cap)
    served = SnapshotLoader(store, cache).load(store.registry.load_manifest(version), None)
    return served, cache


def measure_router_loads(store: ModelStore, version: int, tasks: list[int], repeats: int) -> list[LoadRow]:
    """Time to bring one task's routers from the registry into the device tier (a cold cache each time)."""
    manifest = store.registry.load_manifest(version)
    rows = []
    for task in tasks:
        times = []
        size = 0
        for _ in range(repeats):
            cache = new_router_cache(CPU, None)
            routers = CachedRouters(store.registry, manifest, store.site_dims, cache)
            started = time.perf_counter()
            with routers.hold(task - 1):
                pass
            times.append(time.perf_counter() - started)
            size = cache.stats().device.resident_bytes
        rows.append(LoadRow(task, size, times[0] * 1e3, statistics.median(times) * 1e3))
    return rows


def primary_tasks(served: ServedVersion, pool: Tensor, batch: int) -> list[int]:
    """For each image, the task whose router it uses most often across sites (routed by `served`)."""
    assert isinstance(served.network, CareModel) and served.routers is not None  # routers: CaRE's only
    owners: list[int] = []
    for start in range(0, len(pool), batch):
        selected: list[Tensor] = []
        served.network.forward_features(pool[start : start + batch], served.routers, "fast", selected)
        per_image = torch.cat(selected, dim=1)  # (B, sites * M)
        owners += [Counter(row.tolist()).most_common(1)[0][0] for row in per_image]
    return owners


class Mix:
    """Draws batches of pool indices: tasks uniformly or Zipf-popular, then an image of that task."""

    def __init__(self, owners: list[int], kind: str, seed: int) -> None:
        self.kind = kind
        self.random = random.Random(seed)
        by_task: dict[int, list[int]] = {}
        for index, task in enumerate(owners):
            by_task.setdefault(task, []).append(index)
        self.tasks = sorted(by_task)
        self.images = by_task
        ranks = list(range(1, len(self.tasks) + 1))
        self.random.shuffle(ranks)  # popularity unrelated to task age
        self.weights = [1.0 / r**1.1 for r in ranks] if kind == "skewed" else [1.0] * len(self.tasks)

    def batch(self, size: int) -> list[int]:
        tasks = self.random.choices(self.tasks, weights=self.weights, k=size)
        return [self.random.choice(self.images[t]) for t in tasks]


def measure_latency(
    store: ModelStore,
    version: int,
    pool: Tensor,
    owners: list[int],
    caps: list[float | None],
    batch: int,
    batches: int,
    total_bytes: int,
    progress: Callable[[str], None],
) -> list[LatencyRow]:
    """Batch latency per cap and mix. Within a mix every cap serves the same batches, interleaved batch by batch,
    so that the machine's drifts hit all caps alike and the medians compare like with like."""
    rows = []
    for mix_kind in ("skewed", "uniform"):
        mix = Mix(owners, mix_kind, seed=1)
        configs: list[tuple[float | None, int | None, ServedVersion, Any, list[float], list[int]]] = []
        for fraction in caps:
            cap = None if fraction is None else int(total_bytes * fraction)
            served, cache = _served(store, version, cap)
            configs.append((fraction, cap, served, cache, [], [0]))
        for step in range(batches + 3):
            images = pool[mix.batch(batch)]
            for _fraction, _cap, served, cache, times, peak in configs:
                started = time.perf_counter()
                served.probabilities(images)
                elapsed = time.perf_counter() - started
                peak[0] = max(peak[0], cache.stats().device.resident_bytes)
                if step >= 3:  # the first batches fill the caches
                    times.append(elapsed)
        for fraction, cap, _served_model, cache, times, peak in configs:
            stats = cache.stats()
            lookups = stats.hits + stats.misses
            row = LatencyRow(
                cap_fraction=fraction,
                cap_bytes=cap,
                mix=mix_kind,
                batches=batches,
                p50_ms=statistics.median(times) * 1e3,
                p95_ms=sorted(times)[int(0.95 * (len(times) - 1))] * 1e3,
                hit_ratio=stats.hits / lookups if lookups else 1.0,
                evictions=stats.device.evictions,
                max_resident_bytes=peak[0],
            )
            progress(
                f"{mix_kind} mix, cap {'none' if cap is None else f'{fraction:.0%}'}: p50 {row.p50_ms:.1f} ms, "
                f"hit ratio {row.hit_ratio:.3f}, peak resident {peak[0] / 2**20:.1f} MiB"
            )
            rows.append(row)
    return rows


def _check_caps(caps: list[float | None], total_bytes: int, largest_router: int) -> None:
    """Refuse, before the timed part, a cap that cannot hold even one task's routers (small registries)."""
    too_small = [fraction for fraction in caps if fraction is not None and total_bytes * fraction < largest_router]
    if too_small:
        smallest = largest_router / total_bytes
        raise ValueError(
            f"caps {too_small} of {total_bytes:,} router bytes cannot hold the largest task's routers "
            f"({largest_router:,} bytes); use caps of at least {smallest:.2f} or a registry with more tasks"
        )


def run(
    num_tasks: int,
    caps: list[float | None],
    batch: int,
    batches: int,
    image_size: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    config = ModelConfig(image_size=image_size)
    backbone = build_backbone(config, "bundled")
    config = ModelConfig(image_size=image_size, sites=tuple(backbone.site_names))
    with tempfile.TemporaryDirectory(prefix="care-bench-registry-") as directory:
        store = ModelStore(Registry.from_path(Path(directory)), config, backbone, CPU)
        started = time.perf_counter()
        pool = key_images(num_tasks, image_size)
        manifest = populate(store, num_tasks, classes_per_task=3, keys=pool)
        publish_s = time.perf_counter() - started
        progress(f"published {num_tasks} random tasks in {publish_s:.1f} s")
        verify_started = time.perf_counter()
        store.registry.verify(manifest)
        verify_s = time.perf_counter() - verify_started
        # Registries of fewer than 100 (or 10) tasks time only the tasks they have.
        first_tasks = sorted({task for task in (1, 10, 100, num_tasks) if task <= num_tasks})
        loads = measure_router_loads(store, manifest.version, first_tasks, repeats=5)
        for load in loads:
            progress(f"router of task {load.task} ({load.bytes / 2**20:.2f} MiB): {load.median_ms:.2f} ms")
        # What a server pays to serve this registry from nothing (after its backbone), and to hot-load the next
        # version beside it (only the new task's files are read; earlier tasks' tensors are reused).
        cold_started = time.perf_counter()
        uncapped, uncapped_cache = _served(store, manifest.version, None)
        cold_load_s = time.perf_counter() - cold_started
        assert uncapped.routers is not None
        progress(f"version of {num_tasks} tasks loaded cold in {cold_load_s:.2f} s")
        following = populate(store, 1, parent=manifest, seed=1)
        next_started = time.perf_counter()
        SnapshotLoader(store, uncapped_cache).load(following, uncapped)
        next_load_s = time.perf_counter() - next_started
        progress(f"the next version (one more task) hot-loaded in {next_load_s:.3f} s")
        total = uncapped.routers.total_bytes()
        _check_caps(caps, total, largest_router=max(load.bytes for load in loads))  # the last task's is largest
        owners = primary_tasks(uncapped, pool, batch)
        keyed = sum(owner == task for task, owner in enumerate(owners)) / len(owners)
        progress(f"key images routed mostly to their own task: {keyed:.1%}")
        owners = list(range(num_tasks))  # a request of task t sends key image t
        latency = measure_latency(store, manifest.version, pool, owners, caps, batch, batches, total, progress)
    return {
        "num_tasks": num_tasks,
        "image_size": image_size,
        "batch": batch,
        "router_bytes_total": total,
        "publish_seconds": round(publish_s, 2),
        "verify_seconds": round(verify_s, 2),
        "cold_load_seconds": round(cold_load_s, 3),
        "next_version_load_seconds": round(next_load_s, 3),
        "keyed_fraction": keyed,
        "router_loads": [asdict(row) for row in loads],
        "latency": [asdict(row) for row in latency],
    }


def write_report(result: dict[str, Any], out_dir: Path, meta: dict[str, object]) -> Path:
    return write_json(out_dir, "registry_bench.json", meta, result)


def markdown_tables(result: dict[str, Any]) -> str:
    lines = [
        f"version of {result['num_tasks']} tasks: published in {result['publish_seconds']} s, loaded cold in "
        f"{result['cold_load_seconds']} s; the next version (one more task) hot-loaded in "
        f"{result['next_version_load_seconds']} s",
        "",
        "| task | router bytes | first load (ms) | median load (ms) |",
        "|---|---|---|---|",
    ]
    for row in result["router_loads"]:
        lines.append(f"| {row['task']} | {row['bytes']:,} | {row['first_ms']:.2f} | {row['median_ms']:.2f} |")
    lines += [
        "",
        "| mix | cap (of router bytes) | cap bytes | p50 batch (ms) | p95 batch (ms) | hit ratio | evictions "
        "| peak resident bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["latency"]:
        cap = "none" if row["cap_fraction"] is None else f"{row['cap_fraction']:.0%}"
        cap_bytes = "-" if row["cap_bytes"] is None else f"{row['cap_bytes']:,}"
        lines.append(
            f"| {row['mix']} | {cap} | {cap_bytes} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | "
            f"{row['hit_ratio']:.3f} | {row['evictions']} | {row['max_resident_bytes']:,} |"
        )
    return "\n".join(lines)
