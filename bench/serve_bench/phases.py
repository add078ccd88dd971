"""The phases of `care-bench serve` (latency, throughput, cap, hot-load) and `run`, which builds the tasks, starts
the server and the minimal baseline server and runs them in turn."""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch
from torch import Tensor

from bench.serve_bench.clients import (
    Record,
    Traffic,
    closed_loop,
    encode_images,
    median,
    ms,
    new_client,
    send,
    summarize,
    task_mix,
)
from bench.serve_bench.config import CPU, ServeBenchConfig, bench_settings
from bench.serve_bench.report import targets
from bench.serve_bench.rows import (
    CapResult,
    CapRow,
    CapSide,
    HotloadResult,
    HotloadVersion,
    LatencyRow,
    Measurements,
    ServeBenchResult,
    Skipped,
    ThroughputRow,
)
from bench.serve_bench.server import BaselineProcess, MetricsSnapshot, ServerProcess, window_stats
from bench.serve_bench.workload import Offline, TaskSource
from model.backbone import make_transform
from registry import Registry
from service.inference.backbone import load_backbone
from service.inference.preprocess import Preprocessor
from service.ingest.limits import upload_limits
from service.modelstore import ModelStore
from service.settings import Settings


@dataclass
class Bench:
    """State shared by the phases of one run."""

    config: ServeBenchConfig
    settings: Settings
    store: ModelStore
    tasks: TaskSource
    traffic: Traffic
    keys: Tensor
    offline: Offline
    workdir: Path
    progress: Callable[[str], None]
    servers: list[ServerProcess] = field(default_factory=list)
    baseline: BaselineProcess | None = None

    def start_baseline(self) -> BaselineProcess:
        """The minimal baseline server with the servers' settings (not waited for: it loads while they do)."""
        self.baseline = BaselineProcess(self.settings, self.workdir)
        return self.baseline

    def start_server(self, name: str, cap_bytes: int | None) -> ServerProcess:
        settings = self.settings.model_copy(update={"router_cache_bytes": cap_bytes})
        server = ServerProcess(name, settings, self.workdir)
        self.servers.append(server)
        server.wait_ready()
        return server

    def stop_servers(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()
        if self.baseline is not None:
            self.baseline.stop()
            self.baseline = None


async def latency_phase(bench: Bench, server: ServerProcess, num_tasks: int) -> LatencyRow:
    """One client, requests of B images, each sent to the server and to the minimal baseline server in turn; offline
    backbone and fast path on the same images in between."""
    config = bench.config
    batch = config.request_batch
    mix = task_mix(num_tasks, "uniform", config.seed + num_tasks)
    offline = bench.offline
    baseline = bench.baseline
    assert baseline is not None
    records: list[Record] = []
    baseline_records: list[Record] = []
    times: dict[str, list[float]] = {"backbone": [], "fast": [], "unfolded": [], "paired": [], "paired_baseline": []}
    async with new_client(2) as client:
        warm_end = time.perf_counter() + config.warmup_s
        draw = mix.batch(batch)
        offline.backbone_s(bench.keys[draw])
        offline.path_s(bench.keys[draw], "fast")
        offline.unfolded_backbone_s(bench.keys[draw])
        while time.perf_counter() < warm_end:
            body = bench.traffic.body(mix.batch(batch))
            for url in (server.url, baseline.url):
                await send(client, url, body, batch, config.top_k)
        before = server.metrics()
        start = time.perf_counter()
        end = start + config.duration_s
        step = 0
        while time.perf_counter() < end:
            draw = mix.batch(batch)
            body = bench.traffic.body(draw)
            # The same body to the server and to the baseline, back to back; which goes first alternates every two
            # steps, so that the order is not tied to the offline kind timed below (which alternates every step).
            if (step // 2) % 2 == 0:
                record = await send(client, server.url, body, batch, config.top_k)
                base = await send(client, baseline.url, body, batch, config.top_k)
            else:
                base = await send(client, baseline.url, body, batch, config.top_k)
                record = await send(client, server.url, body, batch, config.top_k)
            records.append(record)
            baseline_records.append(base)
            if record.status == 200 and base.status == 200:
                times["paired_baseline"].append(record.latency / base.latency)
            images = bench.keys[draw]
            # The server is idle now: time one offline pass on the same images, the backbone, the fast path and
            # timm's unfolded backbone in turn, so that each sits next to server requests in time.
            kind = ("backbone", "fast", "unfolded")[step % 3]
            if kind == "backbone":
                seconds = offline.backbone_s(images)
            elif kind == "fast":
                seconds = offline.path_s(images, "fast")
            else:
                seconds = offline.unfolded_backbone_s(images)
            times[kind].append(seconds)
            if kind == "backbone" and record.status == 200:
                times["paired"].append(record.latency / seconds)
            step += 1
        end = time.perf_counter()
        after = server.metrics()
    draw = mix.batch(batch)
    reference = [offline.path_s(bench.keys[draw], "reference") for _ in range(config.reference_repeats)]
    own = offline.own_task_fraction(bench.keys[draw], draw)
    requests = summarize(records, start, end)
    baseline_requests = summarize(baseline_records, start, end)
    backbone_ms, fast_ms, reference_ms = ms(median(times["backbone"])), ms(median(times["fast"])), ms(median(reference))
    stats = window_stats(before, after)
    unfolded_ms = ms(median(times["unfolded"]))
    row: LatencyRow = {
        "tasks": num_tasks,
        "batch": batch,
        **requests,
        **stats,
        "server_rss_bytes": server.rss_bytes(),
        "backbone_ms": backbone_ms,
        "fast_ms": fast_ms,
        "reference_ms": reference_ms,
        "paired_p50_over_backbone": round(median(times["paired"]), 3),
        "offline_samples": len(times["backbone"]),
        "own_task_routing": round(own, 3),
        "p50_over_backbone": round(requests["p50_ms"] / backbone_ms, 3),
        "fast_over_backbone": round(fast_ms / backbone_ms, 3),
        "server_model_over_backbone": round(stats["server_model_ms"] / backbone_ms, 3),
        # timm's backbone as built (batch norms not folded): what "the backbone alone" was before the served one
        # was folded, and what a user running timm gets.
        "unfolded_backbone_ms": unfolded_ms,
        "p50_over_unfolded_backbone": round(requests["p50_ms"] / unfolded_ms, 3),
        "reference_over_fast": round(reference_ms / fast_ms, 2),
        "baseline_requests": baseline_requests["requests"],
        "baseline_failed": baseline_requests["failed"],
        "baseline_p50_ms": baseline_requests["p50_ms"],
        "baseline_p95_ms": baseline_requests["p95_ms"],
        "baseline_rss_bytes": baseline.rss_bytes(),
        "p50_over_baseline": round(requests["p50_ms"] / baseline_requests["p50_ms"], 3),
        "paired_p50_over_baseline": round(median(times["paired_baseline"]), 3),
    }
    bench.progress(
        f"T={num_tasks}: p50 {row['p50_ms']:.1f} ms (p95 {row['p95_ms']:.1f}, p99 {row['p99_ms']:.1f}), backbone alone "
        f"{row['backbone_ms']:.1f} ms ({row['p50_over_backbone']:.2f}x, paired {row['paired_p50_over_backbone']:.2f}x)"
        f", timm's unfolded backbone {row['unfolded_backbone_ms']:.1f} ms ({row['p50_over_unfolded_backbone']:.2f}x)"
        f", baseline server {row['baseline_p50_ms']:.1f} ms ({row['p50_over_baseline']:.2f}x, paired "
        f"{row['paired_p50_over_baseline']:.2f}x), fast {row['fast_ms']:.1f} ms, model in the server "
        f"{row['server_model_ms']:.1f} ms, reference {row['reference_ms']:.1f} ms, hit ratio {row['hit_ratio']}, "
        f"{row['requests']} requests, {row['failed']} failed"
    )
    return row


async def throughput_phase(bench: Bench, server: ServerProcess, num_tasks: int) -> list[ThroughputRow]:
    """Closed-loop clients at each concurrency, single-image (or small) requests, uniform over the tasks; then the
    same clients against the minimal baseline server."""
    config = bench.config
    baseline = bench.baseline
    assert baseline is not None
    rows: list[ThroughputRow] = []
    async with new_client(max(config.concurrency) + 2) as client:
        for clients in config.concurrency:
            mix = task_mix(num_tasks, "uniform", config.seed + clients)
            warm_end = time.perf_counter() + config.warmup_s
            end = warm_end + config.throughput_duration_s
            marks: dict[str, MetricsSnapshot] = {}

            async def mark_window(marks: dict[str, MetricsSnapshot] = marks, warm_end: float = warm_end) -> None:
                await asyncio.sleep(max(0.0, warm_end - time.perf_counter()))
                marks["before"] = await asyncio.to_thread(server.metrics)

            marker = asyncio.create_task(mark_window())
            records = await closed_loop(
                client,
                server.url,
                bench.traffic,
                mix,
                clients,
                config.throughput_images,
                config.top_k,
                end,
            )
            await marker
            after = server.metrics()
            # The baseline right after, at the same concurrency on the same draws, while the server is idle.
            base_warm_end = time.perf_counter() + config.warmup_s
            base_end = base_warm_end + config.throughput_duration_s
            base_mix = task_mix(num_tasks, "uniform", config.seed + clients)
            base_records = await closed_loop(
                client,
                baseline.url,
                bench.traffic,
                base_mix,
                clients,
                config.throughput_images,
                config.top_k,
                base_end,
            )
            base = summarize(base_records, base_warm_end, base_end)
            requests = summarize(records, warm_end, end)
            row: ThroughputRow = {
                "tasks": num_tasks,
                "concurrency": clients,
                "images_per_request": config.throughput_images,
                **requests,
                **window_stats(marks["before"], after),
                "server_rss_bytes": server.rss_bytes(),
                "baseline_images_per_s": base["images_per_s"],
                "baseline_p50_ms": base["p50_ms"],
                "baseline_p99_ms": base["p99_ms"],
                "baseline_failed": base["failed"],
                "images_per_s_over_baseline": round(requests["images_per_s"] / base["images_per_s"], 3)
                if base["images_per_s"]
                else math.nan,
            }
            bench.progress(
                f"T={num_tasks}, {clients} clients: {row['images_per_s']:.1f} images/s, p50 {row['p50_ms']:.1f} ms, "
                f"p99 {row['p99_ms']:.1f} ms, mean batch {row['mean_batch_size']}, {row['failed']} failed; baseline "
                f"server {row['baseline_images_per_s']:.1f} images/s ({row['images_per_s_over_baseline']:.2f}x), p50 "
                f"{row['baseline_p50_ms']:.1f} ms, {row['baseline_failed']} failed"
            )
            rows.append(row)
    return rows


async def cap_phase(bench: Bench, uncapped: ServerProcess, num_tasks: int) -> CapResult:
    """Each cap: a capped server beside the uncapped one, the same skewed requests alternated between the two."""
    config = bench.config
    batch = config.request_batch
    served = bench.offline.served
    assert served is not None and served.routers is not None
    total = served.routers.total_bytes()
    rows: list[CapRow] = []
    for fraction in config.caps:
        cap = max(1, int(total * fraction))
        capped = bench.start_server(f"server-cap-{fraction:g}", cap)
        capped.wait_version(uncapped.model()["model_version"])
        mix = task_mix(num_tasks, "skewed", config.seed + 7)
        records: dict[str, list[Record]] = {"uncapped": [], "capped": []}
        async with new_client(2) as client:
            warm_end = time.perf_counter() + config.warmup_s
            while time.perf_counter() < warm_end:
                body = bench.traffic.body(mix.batch(batch))
                for server in (uncapped, capped):
                    await send(client, server.url, body, batch, config.top_k)
            before = {"uncapped": uncapped.metrics(), "capped": capped.metrics()}
            start = time.perf_counter()
            end = start + config.duration_s
            step = 0
            while time.perf_counter() < end:
                body = bench.traffic.body(mix.batch(batch))
                # Alternate which server goes first, so neither always follows the other's cache-cold pass.
                order = (("uncapped", uncapped), ("capped", capped))
                for name, server in order if step % 2 == 0 else order[::-1]:
                    records[name].append(await send(client, server.url, body, batch, config.top_k))
                step += 1
            end = time.perf_counter()
            after = {"uncapped": uncapped.metrics(), "capped": capped.metrics()}
        sides: dict[str, CapSide] = {
            name: {
                **summarize(records[name], start, end),
                **window_stats(before[name], after[name]),
                "server_rss_bytes": server.rss_bytes(),
            }
            for name, server in (("uncapped", uncapped), ("capped", capped))
        }
        paired = [
            c.latency / u.latency
            for u, c in zip(records["uncapped"], records["capped"], strict=False)
            if u.status == 200 and c.status == 200
        ]
        row: CapRow = {
            "cap_fraction": fraction,
            "cap_bytes": cap,
            "router_bytes_total": total,
            "mix": "skewed",
            "uncapped": sides["uncapped"],
            "capped": sides["capped"],
            "p50_ratio": round(sides["capped"]["p50_ms"] / sides["uncapped"]["p50_ms"], 3),
            "paired_ratio": round(median(paired), 3),
        }
        capped.stop()
        bench.servers.remove(capped)
        bench.progress(
            f"cap {fraction:.0%} ({cap / 2**20:.1f} MiB): p50 {row['capped']['p50_ms']:.1f} ms vs uncapped "
            f"{row['uncapped']['p50_ms']:.1f} ms ({row['p50_ratio']:.2f}x, paired {row['paired_ratio']:.2f}x), hit "
            f"ratio {row['capped']['hit_ratio']} vs {row['uncapped']['hit_ratio']}, resident "
            f"{row['capped']['router_resident_bytes'] / 2**20:.1f} MiB"
        )
        rows.append(row)
    return {"router_bytes_total": total, "rows": rows}


async def hotload_phase(bench: Bench, server: ServerProcess) -> HotloadResult:
    """Clients predict while tasks are published one at a time; time to the first answer of each new version."""
    config = bench.config
    num_tasks = bench.tasks.num_tasks
    mix = task_mix(num_tasks, "uniform", config.seed + 11)
    stop = asyncio.Event()
    seen: dict[int, float] = {}  # version -> end time of its first response
    records: list[Record] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            images = config.throughput_images
            record = await send(client, server.url, bench.traffic.body(mix.batch(images)), images, config.top_k)
            records.append(record)
            if record.version is not None and record.version not in seen:
                seen[record.version] = record.end

    publishes: list[HotloadVersion] = []
    before = server.metrics()
    async with new_client(config.hotload_clients + 2) as client:
        loops = [asyncio.create_task(client_loop(client)) for _ in range(config.hotload_clients)]
        start = time.perf_counter()
        await asyncio.sleep(config.warmup_s)
        for _ in range(config.publishes):
            began = time.perf_counter()
            manifest = await asyncio.to_thread(bench.tasks.publish_uninformative)
            published = time.perf_counter()
            version = manifest.version
            deadline = published + 120.0
            while not any(v >= version for v in seen) and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
            first = min((t for v, t in seen.items() if v >= version), default=math.nan)
            publishes.append(
                {
                    "version": version,
                    "tasks": len(manifest.tasks),
                    "publish_ms": ms(published - began),
                    "to_first_response_ms": ms(first - published),
                }
            )
            await asyncio.sleep(0.2)  # a few requests on the new version before the next one
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*loops)
        end = time.perf_counter()
    after = server.metrics()
    waits = [p["to_first_response_ms"] for p in publishes]
    loads = after.version_loads - before.version_loads
    result: HotloadResult = {
        "clients": config.hotload_clients,
        "publishes": len(publishes),
        "poll_interval_s": config.poll_interval_s,
        **summarize(records, start, end),  # its "failed" counts every request of the phase, not only the window's
        "to_first_response_p50_ms": round(median(waits), 1),
        "to_first_response_max_ms": round(max(waits), 1) if waits else math.nan,
        "version_load_mean_ms": ms((after.version_load_seconds - before.version_load_seconds) / loads)
        if loads
        else math.nan,
        "server_rss_bytes": server.rss_bytes(),
        "versions": publishes,
    }
    bench.progress(
        f"hot-load: {len(publishes)} publishes under {config.hotload_clients} clients, publish -> first response p50 "
        f"{result['to_first_response_p50_ms']:.0f} ms (max {result['to_first_response_max_ms']:.0f} ms), server "
        f"load {result['version_load_mean_ms']} ms, {result['requests']} requests, {result['failed']} failed"
    )
    return result


async def _run(bench: Bench) -> Measurements:
    config = bench.config
    latency: list[LatencyRow] = []
    first = bench.tasks.publish_keyed(config.tasks[0])
    baseline = bench.start_baseline()  # loads its backbone while the server loads its own
    server = bench.start_server("server", None)
    baseline.wait_ready()
    server.wait_version(first.version)
    for count in config.tasks:
        if count != bench.tasks.num_tasks:
            manifest = bench.tasks.publish_keyed(count)
            server.wait_version(manifest.version)
        bench.offline.load(bench.tasks.manifest)  # type: ignore[arg-type]
        latency.append(await latency_phase(bench, server, count))
    largest = config.tasks[-1]
    sizes = sorted({*config.concurrency, config.max_batch_size})
    backbone_throughput = bench.offline.backbone_throughput(sizes, bench.keys, repeats=5)
    bench.progress(f"backbone alone, images/s by batch size: {backbone_throughput}")
    throughput = await throughput_phase(bench, server, largest) if config.concurrency else []
    backbone_after = bench.offline.backbone_throughput([config.max_batch_size], bench.keys, repeats=5)
    caps: CapResult = await cap_phase(bench, server, largest) if config.caps else {"rows": []}
    hotload: HotloadResult | Skipped = await hotload_phase(bench, server) if config.publishes else {}
    return {
        "latency": latency,
        "backbone_images_per_s": {str(k): v for k, v in backbone_throughput.items()},
        "backbone_images_per_s_after": {str(k): v for k, v in backbone_after.items()},
        "throughput": throughput,
        "cap": caps,
        "hotload": hotload,
    }


def run(config: ServeBenchConfig, progress: Callable[[str], None]) -> ServeBenchResult:
    """Build the tasks, start the server and run every phase; returns the raw numbers and the target verdicts."""
    if sorted(config.tasks) != list(config.tasks) or not config.tasks:
        raise ValueError("task counts must be given in increasing order")
    torch.set_num_threads(config.threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the progress
    with tempfile.TemporaryDirectory(prefix="care-bench-serve-") as directory:
        workdir = Path(directory)
        settings = bench_settings(config, workdir / "data")
        model_config, backbone = load_backbone(settings)
        size = model_config.image_size or 224
        store = ModelStore(Registry.from_path(settings.registry_dir), model_config, backbone, CPU)
        largest = config.tasks[-1]
        # The client's images, and exactly what the server makes of them: the tasks are keyed on the latter.
        encoded = encode_images(largest, size, config.image_format, config.seed)
        preprocess = Preprocessor(make_transform(backbone, size), upload_limits(settings), CPU)
        keys = torch.cat([preprocess([(f"key-{i}", data)]) for i, data in enumerate(encoded)])
        started = time.perf_counter()
        tasks = TaskSource(store, keys, config.classes_per_task, config.seed, settings.torch_device())
        progress(
            f"built {largest} keyed tasks ({model_config.backbone}, {size} px) in {time.perf_counter() - started:.0f} s"
        )
        bench = Bench(
            config=config,
            settings=settings,
            store=store,
            tasks=tasks,
            traffic=Traffic(encoded, config.image_format),
            keys=keys,
            offline=Offline(store, settings.torch_device(), load_backbone(settings, fold=False)[1]),
            workdir=workdir,
            progress=progress,
        )
        try:
            measured = asyncio.run(_run(bench))
        finally:
            bench.stop_servers()
    result: ServeBenchResult = {
        **measured,
        "config": {
            **asdict(config),
            "backbone": model_config.backbone,
            "image_size": size,
            "request_batch": config.request_batch,
            "image_bytes_mean": round(statistics.fmean(len(e) for e in encoded)),
        },
        "targets": [],
    }
    result["targets"] = targets(result)
    return result
