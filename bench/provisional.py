"""`care-bench provisional`: provisional classes over HTTP on a real server (issue 12): 202 -> first answer naming
the new class.

Starts `care-serve serve` with its defaults (default image size, training budget) on 127.0.0.1 and a fresh data
directory, teaches the first task of a stream and waits until it is trained, then posts the next tasks back to back
(2 classes x N images each) and polls /predict with 4 test images per task (every 0.5 s) until a top-1 names a class of
that task: the time from the 202 to that answer is the latency (p50 and max over the tasks). Accuracy on the tasks' test
images is measured on the new classes from the provisional version and once trained, and on the first task's
classes before, during (every posted task provisional) and after (every task trained).

    care-bench provisional --stream fmnist5 --tasks 3 --train-per-class 100 --out result.json
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.datasets import Task, make_stream, png_bytes
from bench.harness import base_env, free_port, start_server, wait_task

PROBES = 4  # test images of a task in each probe request: the first answer naming one of its classes counts
TRAIN_TIMEOUT_S = 1800.0  # for a task to be trained, once posted


def post_task(url: str, task: Task) -> tuple[str, float]:
    files = [("images", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(task.train.images)]
    response = httpx.post(f"{url}/tasks", files=files, data={"labels": task.train.labels}, timeout=120)
    response.raise_for_status()
    return str(response.json()["task_id"]), time.monotonic()


def predict(url: str, images: list[Any]) -> list[dict[str, Any]]:
    """Top-1 of each image (label, provisional, model_version), 16 images a request."""
    answers = []
    for start in range(0, len(images), 16):
        batch = images[start : start + 16]
        files = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(batch)]
        body = httpx.post(f"{url}/predict?top_k=1", files=files, timeout=120).json()
        answers += [{**p["top"][0], "model_version": body["model_version"]} for p in body["predictions"]]
    return answers


def accuracy(url: str, tasks: list[Task]) -> dict[str, Any]:
    images = [im for task in tasks for im in task.test.images]
    labels = [label for task in tasks for label in task.test.labels]
    answers = predict(url, images)
    correct = sum(a["label"] == y for a, y in zip(answers, labels, strict=True))
    return {"accuracy": round(correct / len(labels), 4), "versions": sorted({a["model_version"] for a in answers})}


@dataclass(frozen=True)
class ProvisionalConfig:
    """What `run` measures.

    Attributes:
        stream: Offline stream (see `bench.datasets.make_stream`).
        tasks: Tasks in all: the first is trained, the rest measured.
        train_per_class: Training images per class.
        test_per_class: Test images per class.
        late: Post the last task only once the first posted one is training.
        classes_per_task: Glyph streams only: classes in each task (None: the stream's own).
        logs: Keep the server's log here (None: a temporary directory).
    """

    stream: str = "fmnist5"
    tasks: int = 3
    train_per_class: int = 100
    test_per_class: int = 50
    late: bool = False
    classes_per_task: int | None = None
    logs: Path | None = None


def run(config: ProvisionalConfig) -> dict[str, Any]:
    """Start a server, teach the first task, post the rest and measure; returns the raw numbers."""
    shape = {} if config.classes_per_task is None else {"classes_per_task": config.classes_per_task}
    stream = make_stream(
        config.stream, seed=0, train_per_class=config.train_per_class, test_per_class=config.test_per_class, **shape
    )
    tasks = list(stream.tasks)[: config.tasks]
    with tempfile.TemporaryDirectory(prefix="bench-provisional-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        logs = config.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        server = start_server("server", port, base_env(data_dir=f"{tmp}/data", device="cpu"), logs)
        try:
            first, _ = post_task(url, tasks[0])
            trained_first = wait_task(url, first, server.tail, TRAIN_TIMEOUT_S, interval_s=0.5)
            assert trained_first["status"] == "ready", trained_first
            time.sleep(3)  # hot-load
            old_before = accuracy(url, tasks[:1])
            measured = tasks[1:]
            back_to_back = measured[:-1] if config.late else measured
            posted = [post_task(url, task) for task in back_to_back]
            late_id = None
            latency: dict[str, float] = {}
            probes = {t: (task, task.test.images[:PROBES]) for (t, _), task in zip(posted, back_to_back, strict=True)}
            started = dict(posted)
            provisional_answer: dict[str, bool] = {}
            while len(latency) < len(posted) or (config.late and late_id is None):
                if config.late and late_id is None:  # post the last task once the first posted one is training
                    body = httpx.get(f"{url}/tasks/{posted[0][0]}", timeout=10).json()
                    if body["status"] == "training" and (body["progress"] or {}).get("step", 0) >= 1:
                        posted.append(post_task(url, measured[-1]))
                        late_id = posted[-1][0]
                        probes[late_id] = (measured[-1], measured[-1].test.images[:PROBES])
                        started[late_id] = posted[-1][1]
                for task_id, (task, images) in probes.items():
                    if task_id in latency:
                        continue
                    hits = [a for a in predict(url, images) if a["label"] in task.train.labels]
                    if hits:
                        latency[task_id] = time.monotonic() - started[task_id]
                        provisional_answer[task_id] = bool(hits[0]["provisional"])
                time.sleep(0.5)
            statuses = [httpx.get(f"{url}/tasks/{t}", timeout=10).json()["status"] for t, _ in posted]
            new_provisional = accuracy(url, tasks[1:])
            old_during = accuracy(url, tasks[:1])
            during_model = httpx.get(f"{url}/model", timeout=10).json()
            for task_id, _ in posted:
                wait_task(url, task_id, server.tail, TRAIN_TIMEOUT_S, interval_s=0.5)
            time.sleep(3)
            new_trained = accuracy(url, tasks[1:])
            old_after = accuracy(url, tasks[:1])
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
        finally:
            server.stop()
    values = sorted(latency.values())
    result = {
        "stream": config.stream,
        "train_per_class": config.train_per_class,
        "test_per_class": config.test_per_class,
        "measured_tasks": len(posted),
        "latency_s": {"p50": round(statistics.median(values), 2), "max": round(values[-1], 2), "all": values},
        "latency_by_task_s": {task_id: round(latency[task_id], 2) for task_id, _ in posted},
        "late_task": late_id,
        "first_answer_provisional": provisional_answer,
        "statuses_when_answered": statuses,
        "during": {
            "num_provisional_classes": during_model["num_provisional_classes"],
            "model_version": during_model["model_version"],
        },
        "accuracy": {
            "old_before": old_before,
            "old_during": old_during,
            "old_after": old_after,
            "new_provisional": new_provisional,
            "new_trained": new_trained,
        },
        "servable_histogram": [line for line in metrics.splitlines() if line.startswith("care_task_servable_seconds")],
    }
    return result
