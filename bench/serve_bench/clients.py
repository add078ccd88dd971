"""The load generator of `care-bench serve`: encoded images, pre-built request bodies, the task mix, asyncio clients
that time each request, and the statistics of a window of requests."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import torch
from PIL import Image

from bench.registry_bench import Mix
from bench.serve_bench.rows import RequestStats
from bench.synthetic import key_images

logger = logging.getLogger(__name__)

BOUNDARY = "care-serve-bench-boundary"


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


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else math.nan


def ms(seconds: float) -> float:
    """Seconds as milliseconds, to 0.01 ms."""
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
        served = json.loads(response.content).get("model_version")  # the baseline server has no versions
        version = None if served is None else int(served)
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


def summarize(records: Sequence[Record], start: float, end: float) -> RequestStats:
    """Latency percentiles of requests sent and answered within [start, end], and throughput over it."""
    inside = [r for r in records if r.start >= start and r.end <= end]
    ok = [r.latency for r in inside if r.status == 200]
    seconds = end - start
    return {
        "requests": len(inside),
        "failed": sum(1 for r in records if r.status != 200),
        "p50_ms": ms(percentile(ok, 50)),
        "p95_ms": ms(percentile(ok, 95)),
        "p99_ms": ms(percentile(ok, 99)),
        "mean_ms": ms(statistics.fmean(ok)) if ok else math.nan,
        "images_per_s": round(sum(r.images for r in inside if r.status == 200) / seconds, 2) if seconds > 0 else 0.0,
        "requests_per_s": round(len(ok) / seconds, 2) if seconds > 0 else 0.0,
    }
