"""`care-bench train`: how long the service takes to learn a task, as a user sees it.

A real `care-serve serve` (server and its training worker, default settings apart from a temporary data
directory) on loopback; the first tasks of an offline stream (Fashion-MNIST, 2 classes x 100 images each) are
uploaded one at a time as ImageFolder zips, and for each the benchmark records the time from the 202 to the
task's `ready`, the worker's own training time (`started_at` to `finished_at`), and the time until /model serves
the new version. Afterwards the test images of every learned class are predicted over HTTP, as a check that what
was learned in that time is worth having.
"""

from __future__ import annotations

import datetime
import io
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.datasets import make_stream, png_bytes, write_imagefolder_zip
from bench.report import write_json
from bench.serve_bench import ServerProcess
from service.settings import Settings

TARGET_SECONDS = 120.0  # issue 4: a task of 2 classes x 100 images trains in at most 2 minutes with the defaults


@dataclass(frozen=True)
class TrainBenchConfig:
    """What `run` measures.

    Attributes:
        stream: Offline stream (see `bench.datasets.make_stream`).
        tasks: How many of its tasks to teach, one after another.
        train_per_class: Training images per class.
        test_per_class: Test images per class (predicted at the end).
        seed: Seeds the stream.
        timeout_s: Longest wait for one task.
    """

    stream: str = "fmnist5"
    tasks: int = 2
    train_per_class: int = 100
    test_per_class: int = 50
    seed: int = 0
    timeout_s: float = 900.0


def _timestamp(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def teach(client: httpx.Client, archive: bytes, timeout_s: float, server: ServerProcess) -> dict[str, Any]:
    """Upload one task, wait until it is ready and served; returns its timings (seconds) and final record."""
    accepted_at = time.perf_counter()
    response = client.post("/tasks", files={"archive": ("task.zip", archive, "application/zip")})
    if response.status_code != 202:
        raise RuntimeError(f"POST /tasks answered {response.status_code}: {response.text[:500]}")
    task_id = response.json()["task_id"]

    def finished() -> dict[str, Any] | None:
        record: dict[str, Any] = client.get(f"/tasks/{task_id}").json()
        if record["status"] == "failed":
            raise RuntimeError(f"task {task_id} failed: {record['error']}")
        return record if record["status"] == "ready" else None

    record = server.process.wait(f"training task {task_id}", finished, timeout_s, interval_s=0.2)
    ready_at = time.perf_counter()
    version = int(record["model_version"])

    def serving() -> dict[str, Any] | None:
        model: dict[str, Any] = client.get("/model").json()
        return model if (model["model_version"] or 0) >= version else None

    server.process.wait(f"serving version {version}", serving, timeout_s, interval_s=0.2)
    served_at = time.perf_counter()
    return {
        "task_id": task_id,
        "classes": record["classes"],
        "num_images": record["num_images"],
        "model_version": version,
        "accepted_to_ready_s": round(ready_at - accepted_at, 2),
        "training_s": round((_timestamp(record["finished_at"]) - _timestamp(record["started_at"])).total_seconds(), 2),
        "accepted_to_served_s": round(served_at - accepted_at, 2),
        "train_metrics": record["metrics"],
    }


def predict_accuracy(client: httpx.Client, images: list[bytes], labels: list[str], batch: int = 16) -> float:
    """Top-1 accuracy of /predict over `images`, sent `batch` per request."""
    correct = 0
    for start in range(0, len(images), batch):
        files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images[start : start + batch])]
        response = client.post("/predict", params={"top_k": 1}, files=files)
        response.raise_for_status()
        predicted = [item["top"][0]["label"] for item in response.json()["predictions"]]
        correct += sum(p == t for p, t in zip(predicted, labels[start : start + batch], strict=True))
    return correct / len(images)


def run(config: TrainBenchConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    """Start the service, teach the tasks, predict; returns the raw numbers."""
    stream = make_stream(
        config.stream, seed=config.seed, train_per_class=config.train_per_class, test_per_class=config.test_per_class
    )
    tasks = list(stream)[: config.tasks]
    with tempfile.TemporaryDirectory(prefix="care-bench-train-") as directory:
        workdir = Path(directory)
        settings = Settings(data_dir=workdir / "data", log_level="WARNING", admin_token=None, api_key=None)
        started = time.perf_counter()
        server = ServerProcess("server", settings, workdir, worker=True)
        try:
            server.wait_ready()
            startup_s = time.perf_counter() - started
            rows = []
            with httpx.Client(base_url=server.url, timeout=120.0, trust_env=False) as client:
                for task in tasks:
                    archive = io.BytesIO()
                    write_imagefolder_zip(task, archive)
                    row = teach(client, archive.getvalue(), config.timeout_s, server)
                    progress(
                        f"task {task.index} ({', '.join(row['classes'])}, {row['num_images']} images): ready after "
                        f"{row['accepted_to_ready_s']:.1f} s (training {row['training_s']:.1f} s), served after "
                        f"{row['accepted_to_served_s']:.1f} s"
                    )
                    rows.append(row)
                test = [
                    (png_bytes(image), label)
                    for task in tasks
                    for image, label in zip(task.test.images, task.test.labels, strict=True)
                ]
                accuracy = predict_accuracy(client, [image for image, _ in test], [label for _, label in test])
                model = client.get("/model").json()
        finally:
            server.stop()
    return {
        "config": {**asdict(config), "settings": _reported_settings(settings)},
        "startup_s": round(startup_s, 2),
        "tasks": rows,
        "test_images": len(test),
        "test_accuracy": round(accuracy, 4),
        "model": {key: model.get(key) for key in ("backbone", "model_version", "num_tasks", "num_classes")},
        "target": {
            "limit_s": TARGET_SECONDS,
            "value_s": max(row["accepted_to_ready_s"] for row in rows),
            "met": max(row["accepted_to_ready_s"] for row in rows) <= TARGET_SECONDS,
        },
    }


def _reported_settings(settings: Settings) -> dict[str, Any]:
    names = ("backbone", "image_size", "serve_threads", "train_threads", "train_epochs", "train_batch_size")
    return {name: getattr(settings, name) for name in names}


def write_report(result: dict[str, Any], out_dir: Path, meta: dict[str, object]) -> Path:
    return write_json(out_dir, "train_bench.json", meta, result)


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        "| task | classes | images | 202 -> ready (s) | training (s) | 202 -> served (s) |",
        "|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(result["tasks"]):
        lines.append(
            f"| {index} | {', '.join(row['classes'])} | {row['num_images']} | {row['accepted_to_ready_s']} | "
            f"{row['training_s']} | {row['accepted_to_served_s']} |"
        )
    target = result["target"]
    lines += [
        "",
        f"Top-1 accuracy over the {result['test_images']} test images of the learned classes: "
        f"{result['test_accuracy']:.1%}. Server start-up: {result['startup_s']} s.",
        f"Target (slowest task ready within {target['limit_s']:.0f} s): {target['value_s']} s, "
        f"{'met' if target['met'] else 'NOT met'}.",
    ]
    return "\n".join(lines)
