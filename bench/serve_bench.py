"""`care-bench serve`: the real server under load, against the frozen backbone alone in the same run.

One `care-serve serve --no-worker` process runs on loopback over a temporary registry of keyed random-weight tasks
(`bench.synthetic.keyed_learned_tasks`: image t is routed to task t, as trained tasks route their own
classes). The tasks are built once, then published as versions of 1, 10, 100 and 300 tasks; the server hot-loads
each one and is measured on it before the next is published. Clients are asyncio coroutines in this process that
send pre-built multipart bodies of pre-encoded images, so a request costs the client almost nothing.

Phases:

* latency (per task count T): one client sends requests of B images (B = the server's largest batch, so every
  request is one batch) drawn uniformly from the T tasks' images. Between two requests, while the server is idle,
  this process times the backbone alone (`forward_plain`) and the fast path on the same B preprocessed images,
  alternately, so that the machine's drifts hit all three alike; the reference path is timed after the phase.
* throughput (largest T): C closed-loop clients (C = 1, 2, 4, ...) send single-image requests; images per second
  against the offline backbone's throughput at the server's largest batch size.
* cap (largest T): a second server with the router cache capped at a fraction of all router bytes; one client
  alternates the same skewed-mix requests (Zipf 1.1 task popularity) between it and the uncapped server.
* hot-load (largest T): clients keep predicting while tasks are published one at a time; the time from each
  publish to the first response served by the new version, and every failed request.

Batch sizes, router cache hit ratios and resident bytes come from the servers' /metrics, as deltas over each
measured window; resident set sizes from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from torch import Tensor

from bench.model_bench import time_call
from bench.registry_bench import Mix
from bench.report import write_json
from bench.synthetic import key_images, keyed_learned_tasks
from model.adapter import TaskModules
from model.alignment import ClassStatistics
from model.backbone import SiteBackbone, make_transform
from model.synthetic import random_task, synthetic_head
from model.trainer import LearnedTask
from registry import Manifest, Registry
from service.inference.backbone import load_backbone
from service.inference.preprocess import Preprocessor
from service.inference.snapshot import ServedModel, SnapshotLoader
from service.ingest.limits import upload_limits
from service.modelstore import ModelStore, NewTask
from service.routers.source import new_router_cache
from service.settings import Settings

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")
BOUNDARY = "care-serve-bench-boundary"
# Target thresholds of issue 6, checked by `targets`.
TARGET_LATENCY_OVER_BACKBONE = 1.3
TARGET_LATENCY_MAX_OVER_10 = 1.15
TARGET_REFERENCE_OVER_FAST = 5.0
TARGET_THROUGHPUT_OVER_BACKBONE = 0.8
TARGET_CAP_FRACTION = 0.1
TARGET_CAP_P50_RATIO = 1.2


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


# --------------------------------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


# --------------------------------------------------------------------------------------------------------------------
# Traffic: encoded images, request bodies and the task mix


def encode_images(count: int, size: int, image_format: str, seed: int) -> list[bytes]:
    """`count` smooth random colour images of `size` x `size` pixels, encoded as the client sends them."""
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    encoded = []
    for image in key_images(count, size, seed):
        pixels = ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG" if image_format == "jpeg" else "PNG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


class Traffic:
    """Pre-built multipart parts, one per key image; a request body is a join of parts (no per-request encoding)."""

    content_type = f"multipart/form-data; boundary={BOUNDARY}"

    def __init__(self, encoded: Sequence[bytes], image_format: str) -> None:
        mime = "image/jpeg" if image_format == "jpeg" else "image/png"
        self.parts = [
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="key-{index}.{image_format}"'
                f"\r\nContent-Type: {mime}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
            for index, data in enumerate(encoded)
        ]
        self.closing = f"--{BOUNDARY}--\r\n".encode()

    def body(self, images: Sequence[int]) -> bytes:
        return b"".join([*(self.parts[i] for i in images), self.closing])


def task_mix(num_tasks: int, kind: str, seed: int) -> Mix:
    """Draws key images of tasks 0..num_tasks-1, uniformly or with Zipf(1.1) popularity (ranks shuffled)."""
    return Mix(list(range(num_tasks)), kind, seed)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic tasks


def _learned(index: int, task: TaskModules, shared: Any, classifier: Tensor, store: ModelStore) -> LearnedTask:
    """A LearnedTask with `classifier` (every class so far) and statistics of the right shape (never read)."""
    rows, dim = classifier.shape
    statistics_ = ClassStatistics(classifier, torch.ones(1, dim).expand(rows, dim), torch.ones(rows, dtype=torch.long))
    head = synthetic_head(store.config, classifier, store.backbone.site_dims)
    return LearnedTask(index, task, shared, classifier, statistics_, head=head)


class TaskSource:
    """Keyed tasks built once, published as versions of growing size; then uninformative tasks one at a time.

    Args:
        store: Where to publish.
        keys: One preprocessed image per keyed task (exactly what the server computes from the client's images).
        classes: Classes per task.
        seed: Seeds the task weights.
    """

    def __init__(self, store: ModelStore, keys: Tensor, classes: int, seed: int) -> None:
        self.store = store
        self.classes = classes
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.keyed = keyed_learned_tasks(store, keys, classes, torch.Generator().manual_seed(seed))
        self.full_classifier = self.keyed[-1].classifier
        self.manifest: Manifest | None = None
        self.classifier = torch.empty(0, store.backbone.feature_dim)

    @property
    def num_tasks(self) -> int:
        return 0 if self.manifest is None else len(self.manifest.tasks)

    def publish_keyed(self, upto: int) -> Manifest:
        """Publish keyed tasks num_tasks..upto-1 as one version."""
        start = self.num_tasks
        self.classifier = self.full_classifier[: upto * self.classes]
        new = []
        for index in range(start, upto):
            learned = self.keyed[index]
            if index == upto - 1:
                learned = _learned(index, learned.task, learned.shared, self.classifier, self.store)
            new.append(NewTask(learned, f"t-syn{index:06d}", [f"c{index}-{k}" for k in range(self.classes)]))
        self.manifest = self.store.publish(self.manifest, new)
        return self.manifest

    def publish_uninformative(self) -> Manifest:
        """Publish one random task whose perceptrons are uniform: it never wins a routing decision, so the traffic
        keeps its routing and the hot-load time is not mixed up with a change of cache behaviour."""
        index = self.num_tasks
        task = random_task(self.store.config, self.store.backbone.site_dims, index, self.classes, self.generator)
        with torch.no_grad():
            for site in range(task.num_sites):
                task.perceptron(site).linear.weight.zero_()
                task.perceptron(site).linear.bias.zero_()
        rows = torch.randn(self.classes, self.store.backbone.feature_dim, generator=self.generator)
        self.classifier = torch.cat([self.classifier, rows])
        learned = _learned(index, task, None, self.classifier, self.store)
        new = NewTask(learned, f"t-hot{index:06d}", [f"h{index}-{k}" for k in range(self.classes)])
        self.manifest = self.store.publish(self.manifest, [new])
        return self.manifest


# --------------------------------------------------------------------------------------------------------------------
# Server processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command() -> list[str]:
    """`care-serve` next to this interpreter (a virtualenv's script), else the module."""
    script = Path(sys.executable).with_name("care-serve")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]


@dataclass(frozen=True)
class MetricsSnapshot:
    """The /metrics series the benchmark reads (cumulative counters; subtract two snapshots for a window)."""

    batch_count: float
    batch_sum: float
    batch_buckets: dict[str, float]
    hits: float
    misses: float
    evictions: float
    resident_bytes: float
    resident_routers: float
    version_loads: float
    version_load_seconds: float

    @classmethod
    def parse(cls, text: str) -> MetricsSnapshot:
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)

        def get(name: str, **labels: str) -> float:
            return values.get((name, tuple(sorted(labels.items()))), 0.0)

        buckets = {dict(key[1])["le"]: value for key, value in values.items() if key[0] == "care_batch_size_bucket"}
        return cls(
            batch_count=get("care_batch_size_count"),
            batch_sum=get("care_batch_size_sum"),
            batch_buckets=buckets,
            hits=get("care_router_cache_lookups_total", result="hit"),
            misses=get("care_router_cache_lookups_total", result="miss"),
            evictions=get("care_router_cache_evictions_total", tier="device"),
            resident_bytes=get("care_router_cache_resident_bytes", tier="device"),
            resident_routers=get("care_router_cache_resident_routers", tier="device"),
            version_loads=get("care_version_load_seconds_count"),
            version_load_seconds=get("care_version_load_seconds_sum"),
        )


def window_stats(before: MetricsSnapshot, after: MetricsSnapshot) -> dict[str, Any]:
    """Batch sizes, router cache hit ratio and resident bytes over the window between two snapshots."""
    batches = after.batch_count - before.batch_count
    lookups = (after.hits - before.hits) + (after.misses - before.misses)
    previous = 0.0
    histogram: dict[str, int] = {}
    for bound, cumulative in sorted(after.batch_buckets.items(), key=lambda item: float(item[0])):
        count = cumulative - before.batch_buckets.get(bound, 0.0)
        histogram[f"<={bound}"] = int(count - previous)
        previous = count
    return {
        "batches": int(batches),
        "mean_batch_size": round((after.batch_sum - before.batch_sum) / batches, 2) if batches else math.nan,
        "batch_size_histogram": {k: v for k, v in histogram.items() if v},
        "router_lookups": int(lookups),
        "hit_ratio": round((after.hits - before.hits) / lookups, 4) if lookups else math.nan,
        "evictions": int(after.evictions - before.evictions),
        "router_resident_bytes": int(after.resident_bytes),
        "routers_resident": int(after.resident_routers),
    }


class ServerProcess:
    """One `care-serve serve` on a loopback port, in its own session so it can always be stopped.

    Args:
        name: For logs.
        settings: The server's settings, passed as CARE_ variables.
        log_dir: Where its output goes.
        worker: Start the training worker too (the benchmarks of serving leave it out).
    """

    def __init__(self, name: str, settings: Settings, log_dir: Path, worker: bool = False) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARE_")}
        env.update(settings.environment())
        env.update({"HF_HUB_OFFLINE": "1", "CARE_PORT": str(self.port), "CARE_HOST": "127.0.0.1"})
        self.log = log_dir / f"{name}.log"
        argv = [
            *server_command(),
            "serve",
            *([] if worker else ["--no-worker"]),
            "--port",
            str(self.port),
            "--data-dir",
            str(settings.data_dir),
        ]
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _wait(self, what: str, probe: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                if probe():
                    return
            time.sleep(0.05)
        raise TimeoutError(f"server {self.name}: no {what} after {timeout_s:.0f} s:\n{self.tail()}")

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        self._wait("readiness", lambda: httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200, timeout_s)

    def model(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.url}/model", timeout=10).json()
        return answer

    def wait_version(self, version: int, timeout_s: float = 600.0) -> None:
        self._wait(f"version {version}", lambda: (self.model()["model_version"] or 0) >= version, timeout_s)

    def metrics(self) -> MetricsSnapshot:
        return MetricsSnapshot.parse(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux; 0 elsewhere)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)  # its own session: only this server
                self.popen.wait(10)


# --------------------------------------------------------------------------------------------------------------------
# Clients


@dataclass(frozen=True)
class Record:
    """One request: when it was sent and answered (perf_counter seconds), its status, images and served version."""

    start: float
    end: float
    status: int
    images: int
    version: int | None

    @property
    def latency(self) -> float:
        return self.end - self.start


async def send(client: httpx.AsyncClient, url: str, body: bytes, images: int, top_k: int) -> Record:
    """POST one multipart body to /predict; a transport error counts as status 0 (a failed request)."""
    started = time.perf_counter()
    try:
        response = await client.post(
            f"{url}/predict", params={"top_k": top_k}, content=body, headers={"Content-Type": Traffic.content_type}
        )
    except httpx.HTTPError as error:
        logger.warning("request failed: %r", error)
        return Record(started, time.perf_counter(), 0, images, None)
    ended = time.perf_counter()
    version = None
    if response.status_code == 200:
        version = int(json.loads(response.content)["model_version"])
    else:
        logger.warning("request answered %d: %s", response.status_code, response.text[:300])
    return Record(started, ended, response.status_code, images, version)


def new_client(connections: int) -> httpx.AsyncClient:
    # trust_env=False: a proxy from the environment must not sit between the clients and a loopback server.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits, trust_env=False)


async def closed_loop(
    client: httpx.AsyncClient,
    url: str,
    traffic: Traffic,
    mix: Mix,
    clients: int,
    images: int,
    top_k: int,
    deadline: float,
) -> list[Record]:
    """`clients` coroutines that each send a request as soon as the previous one is answered, until `deadline`."""
    records: list[Record] = []

    async def one() -> None:
        while time.perf_counter() < deadline:
            draw = mix.batch(images)
            records.append(await send(client, url, traffic.body(draw), images, top_k))

    await asyncio.gather(*(one() for _ in range(clients)))
    return records


def summarize(records: Sequence[Record], start: float, end: float) -> dict[str, Any]:
    """Latency percentiles of requests sent and answered within [start, end], and throughput over it."""
    inside = [r for r in records if r.start >= start and r.end <= end]
    ok = [r.latency for r in inside if r.status == 200]
    seconds = end - start
    return {
        "requests": len(inside),
        "failed": sum(1 for r in records if r.status != 200),
        "p50_ms": _ms(percentile(ok, 50)),
        "p95_ms": _ms(percentile(ok, 95)),
        "p99_ms": _ms(percentile(ok, 99)),
        "mean_ms": _ms(statistics.fmean(ok)) if ok else math.nan,
        "images_per_s": round(sum(r.images for r in inside if r.status == 200) / seconds, 2) if seconds > 0 else 0.0,
        "requests_per_s": round(len(ok) / seconds, 2) if seconds > 0 else 0.0,
    }


# --------------------------------------------------------------------------------------------------------------------
# Offline timings in this process (the server idle meanwhile)


class Offline:
    """The backbone alone, and the fast and reference paths of a version, in this process."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.backbone: SiteBackbone = store.backbone
        self.loader = SnapshotLoader(store, new_router_cache(CPU, None))
        self.served: ServedModel | None = None

    def load(self, manifest: Manifest) -> ServedModel:
        self.served = self.loader.load(manifest, self.served)
        return self.served

    def backbone_s(self, images: Tensor) -> float:
        with torch.inference_mode():
            return time_call(lambda: self.backbone.forward_plain(images))

    def path_s(self, images: Tensor, path: str) -> float:
        served = self.served
        assert served is not None and served.model is not None and served.routers is not None
        model, routers = served.model, served.routers
        with torch.inference_mode():
            return time_call(lambda: model.logits(images, routers, "fast" if path == "fast" else "reference"))

    def own_task_fraction(self, images: Tensor, tasks: Sequence[int]) -> float:
        """Fraction of images whose most used router (over sites and the M picks) is their own task's."""
        served = self.served
        assert served is not None and served.model is not None and served.routers is not None
        selected: list[Tensor] = []
        served.model.forward_features(images, served.routers, "fast", selected)
        per_image = torch.cat(selected, dim=1)
        own = [int(torch.mode(row).values) == task for row, task in zip(per_image, tasks, strict=True)]
        return sum(own) / len(own)

    def backbone_throughput(self, batch_sizes: Sequence[int], pool: Tensor, repeats: int) -> dict[int, float]:
        """Images per second of the backbone alone at each batch size (median of `repeats` forward passes)."""
        result = {}
        for size in batch_sizes:
            images = pool[torch.arange(size) % len(pool)]
            self.backbone_s(images)
            times = [self.backbone_s(images) for _ in range(repeats)]
            result[size] = round(size / statistics.median(times), 2)
        return result


# --------------------------------------------------------------------------------------------------------------------
# The benchmark


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


async def latency_phase(bench: Bench, server: ServerProcess, num_tasks: int) -> dict[str, Any]:
    """One client, requests of B images; offline backbone and fast path on the same images in between."""
    config = bench.config
    batch = config.request_batch
    mix = task_mix(num_tasks, "uniform", config.seed + num_tasks)
    offline = bench.offline
    records: list[Record] = []
    times: dict[str, list[float]] = {"backbone": [], "fast": [], "paired": []}
    async with new_client(2) as client:
        warm_end = time.perf_counter() + config.warmup_s
        draw = mix.batch(batch)
        offline.backbone_s(bench.keys[draw])
        offline.path_s(bench.keys[draw], "fast")
        while time.perf_counter() < warm_end:
            await send(client, server.url, bench.traffic.body(mix.batch(batch)), batch, config.top_k)
        before = server.metrics()
        start = time.perf_counter()
        end = start + config.duration_s
        step = 0
        while time.perf_counter() < end:
            draw = mix.batch(batch)
            record = await send(client, server.url, bench.traffic.body(draw), batch, config.top_k)
            records.append(record)
            images = bench.keys[draw]
            # The server is idle now: time one offline pass on the same images, the backbone and the fast path in
            # turn, so that both sit next to server requests in time.
            kind = "backbone" if step % 2 == 0 else "fast"
            seconds = offline.backbone_s(images) if kind == "backbone" else offline.path_s(images, "fast")
            times[kind].append(seconds)
            if kind == "backbone" and record.status == 200:
                times["paired"].append(record.latency / seconds)
            step += 1
        end = time.perf_counter()
        after = server.metrics()
    draw = mix.batch(batch)
    reference = [offline.path_s(bench.keys[draw], "reference") for _ in range(config.reference_repeats)]
    own = offline.own_task_fraction(bench.keys[draw], draw)
    row = {
        "tasks": num_tasks,
        "batch": batch,
        **summarize(records, start, end),
        **window_stats(before, after),
        "server_rss_bytes": server.rss_bytes(),
        "backbone_ms": _ms(_median(times["backbone"])),
        "fast_ms": _ms(_median(times["fast"])),
        "reference_ms": _ms(_median(reference)),
        "paired_p50_over_backbone": round(_median(times["paired"]), 3),
        "offline_samples": len(times["backbone"]),
        "own_task_routing": round(own, 3),
    }
    row["p50_over_backbone"] = round(row["p50_ms"] / row["backbone_ms"], 3)
    row["fast_over_backbone"] = round(row["fast_ms"] / row["backbone_ms"], 3)
    row["reference_over_fast"] = round(row["reference_ms"] / row["fast_ms"], 2)
    bench.progress(
        f"T={num_tasks}: p50 {row['p50_ms']:.1f} ms (p95 {row['p95_ms']:.1f}, p99 {row['p99_ms']:.1f}), backbone alone "
        f"{row['backbone_ms']:.1f} ms ({row['p50_over_backbone']:.2f}x, paired {row['paired_p50_over_backbone']:.2f}x)"
        f", fast {row['fast_ms']:.1f} ms, reference {row['reference_ms']:.1f} ms, hit ratio {row['hit_ratio']}, "
        f"{row['requests']} requests, {row['failed']} failed"
    )
    return row


async def throughput_phase(bench: Bench, server: ServerProcess, num_tasks: int) -> list[dict[str, Any]]:
    """Closed-loop clients at each concurrency, single-image (or small) requests, uniform over the tasks."""
    config = bench.config
    rows = []
    async with new_client(max(config.concurrency) + 2) as client:
        for clients in config.concurrency:
            mix = task_mix(num_tasks, "uniform", config.seed + clients)
            warm_end = time.perf_counter() + config.warmup_s
            end = warm_end + config.throughput_duration_s
            marks: dict[str, Any] = {}

            async def mark_window(marks: dict[str, Any] = marks, warm_end: float = warm_end) -> None:
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
            row = {
                "tasks": num_tasks,
                "concurrency": clients,
                "images_per_request": config.throughput_images,
                **summarize(records, warm_end, end),
                **window_stats(marks["before"], after),
                "server_rss_bytes": server.rss_bytes(),
            }
            bench.progress(
                f"T={num_tasks}, {clients} clients: {row['images_per_s']:.1f} images/s, p50 {row['p50_ms']:.1f} ms, "
                f"p99 {row['p99_ms']:.1f} ms, mean batch {row['mean_batch_size']}, {row['failed']} failed"
            )
            rows.append(row)
    return rows


async def cap_phase(bench: Bench, uncapped: ServerProcess, num_tasks: int) -> dict[str, Any]:
    """Each cap: a capped server beside the uncapped one, the same skewed requests alternated between the two."""
    config = bench.config
    batch = config.request_batch
    served = bench.offline.served
    assert served is not None and served.routers is not None
    total = served.routers.total_bytes()
    rows = []
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
        row: dict[str, Any] = {"cap_fraction": fraction, "cap_bytes": cap, "router_bytes_total": total, "mix": "skewed"}
        for name, server in (("uncapped", uncapped), ("capped", capped)):
            stats = {**summarize(records[name], start, end), **window_stats(before[name], after[name])}
            stats["server_rss_bytes"] = server.rss_bytes()
            row[name] = stats
        paired = [
            c.latency / u.latency
            for u, c in zip(records["uncapped"], records["capped"], strict=False)
            if u.status == 200 and c.status == 200
        ]
        row["p50_ratio"] = round(row["capped"]["p50_ms"] / row["uncapped"]["p50_ms"], 3)
        row["paired_ratio"] = round(_median(paired), 3)
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


async def hotload_phase(bench: Bench, server: ServerProcess) -> dict[str, Any]:
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

    publishes = []
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
                    "publish_ms": _ms(published - began),
                    "to_first_response_ms": _ms(first - published),
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
    result = {
        "clients": config.hotload_clients,
        "publishes": len(publishes),
        "poll_interval_s": config.poll_interval_s,
        **summarize(records, start, end),
        "failed": sum(1 for r in records if r.status != 200),
        "to_first_response_p50_ms": round(_median(waits), 1),
        "to_first_response_max_ms": round(max(waits), 1) if waits else math.nan,
        "version_load_mean_ms": _ms((after.version_load_seconds - before.version_load_seconds) / loads)
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


async def _run(bench: Bench) -> dict[str, Any]:
    config = bench.config
    latency = []
    first = bench.tasks.publish_keyed(config.tasks[0])
    server = bench.start_server("server", None)
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
    caps = await cap_phase(bench, server, largest) if config.caps else {"rows": []}
    hotload = await hotload_phase(bench, server) if config.publishes else {}
    return {
        "latency": latency,
        "backbone_images_per_s": {str(k): v for k, v in backbone_throughput.items()},
        "backbone_images_per_s_after": {str(k): v for k, v in backbone_after.items()},
        "throughput": throughput,
        "cap": caps,
        "hotload": hotload,
    }


def run(config: ServeBenchConfig, progress: Callable[[str], None]) -> dict[str, Any]:
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
        tasks = TaskSource(store, keys, config.classes_per_task, config.seed)
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
            offline=Offline(store),
            workdir=workdir,
            progress=progress,
        )
        try:
            result = asyncio.run(_run(bench))
        finally:
            bench.stop_servers()
    result["config"] = {
        **asdict(config),
        "backbone": model_config.backbone,
        "image_size": size,
        "request_batch": config.request_batch,
        "image_bytes_mean": round(statistics.fmean(len(e) for e in encoded)),
    }
    result["targets"] = targets(result)
    return result


# --------------------------------------------------------------------------------------------------------------------
# Targets, report and plots


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 6 with its number and whether it is met (None: not measured in this run)."""
    latency = {row["tasks"]: row for row in result["latency"]}
    largest = max(latency)
    out: list[dict[str, Any]] = []

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
            f"{best['images_per_s']} images/s ({best['concurrency']} clients) / {offline:.1f} images/s",
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
    if result["hotload"]:
        hot = result["hotload"]
        add(
            f"failed requests over {hot['publishes']} publishes under load",
            hot["failed"],
            0,
            True,
            f"publish -> first response p50 {hot['to_first_response_p50_ms']} ms, max {hot['to_first_response_max_ms']}"
            " ms",
        )
    return out


def write_report(result: dict[str, Any], out_dir: Path, meta: dict[str, object]) -> Path:
    """JSON of the raw numbers and three PNG plots; returns the JSON path."""
    path = write_json(out_dir, "serve_bench.json", meta, result)
    for name, plot in _plots().items():
        plot(result, out_dir / f"serve_bench_{name}.png")
    return path


def _plots() -> dict[str, Callable[[dict[str, Any], Path], None]]:
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


def _plot_latency(result: dict[str, Any], path: Path) -> None:
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
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("tasks learned")
        axis.set_ylabel(f"ms per request of {rows[0]['batch']} images")
        axis.set_title("latency against the number of tasks")
        axis.legend(fontsize=8)


def _plot_throughput(result: dict[str, Any], path: Path) -> None:
    rows = result["throughput"]
    with _figure(path) as axis:
        if rows:
            clients = [r["concurrency"] for r in rows]
            axis.plot(clients, [r["images_per_s"] for r in rows], "o-", label=f"server, {rows[0]['tasks']} tasks")
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


def _plot_cache(result: dict[str, Any], path: Path) -> None:
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


def markdown_tables(result: dict[str, Any]) -> str:
    lines = [
        "| tasks | batch | p50 (ms) | p95 (ms) | p99 (ms) | requests | failed | backbone alone (ms) | p50 / backbone "
        "| fast (ms) | reference (ms) | reference / fast | mean batch | hit ratio | router bytes | server RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["latency"]:
        lines.append(
            f"| {r['tasks']} | {r['batch']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['requests']} | {r['failed']} | {r['backbone_ms']:.1f} | {r['p50_over_backbone']:.2f}x | "
            f"{r['fast_ms']:.1f} | {r['reference_ms']:.1f} | {r['reference_over_fast']:.1f}x | "
            f"{r['mean_batch_size']} | {r['hit_ratio']} | {r['router_resident_bytes']:,} | "
            f"{r['server_rss_bytes'] / 2**20:.0f} |"
        )
    if result["throughput"]:
        lines += [
            "",
            "| tasks | clients | images/s | backbone alone, batch = clients (images/s) | p50 (ms) | p95 (ms) "
            "| p99 (ms) | mean batch | hit ratio | failed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["throughput"]:
            alone = result["backbone_images_per_s"].get(str(r["concurrency"]), math.nan)
            lines.append(
                f"| {r['tasks']} | {r['concurrency']} | {r['images_per_s']:.1f} | {alone} | {r['p50_ms']:.1f} | "
                f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch_size']} | {r['hit_ratio']} | {r['failed']} |"
            )
    if result["cap"]["rows"]:
        lines += [
            "",
            "| cap (of router bytes) | cap bytes | p50 capped (ms) | p50 uncapped (ms) | ratio | paired ratio "
            "| hit ratio capped | hit ratio uncapped | evictions | resident bytes capped |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["cap"]["rows"]:
            c, u = r["capped"], r["uncapped"]
            lines.append(
                f"| {r['cap_fraction']:.0%} | {r['cap_bytes']:,} | {c['p50_ms']:.1f} | {u['p50_ms']:.1f} | "
                f"{r['p50_ratio']:.2f}x | {r['paired_ratio']:.2f}x | {c['hit_ratio']} | {u['hit_ratio']} | "
                f"{c['evictions']} | {c['router_resident_bytes']:,} |"
            )
    if result["hotload"]:
        h = result["hotload"]
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
    for t in result["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        limit = f"{'<=' if t['at_most'] else '>='} {t['limit']}"
        lines.append(f"| {t['target']} | {t['value']} ({t['detail']}) | {limit} | {verdict} |")
    return "\n".join(lines)
