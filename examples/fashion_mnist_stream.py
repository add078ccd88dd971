"""Stream Fashion-MNIST into a running care-serve as 5 tasks of 2 classes and track accuracy on all seen classes.

For each task the script uploads the labelled training images to ``POST /tasks``, follows the training with a
progress bar (``GET /tasks/{id}``), waits until the server serves the new model version (``GET /model``), then
sends the test images of every class seen so far to ``POST /predict`` and prints the top-1 accuracy.

Run it (Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``, ``make apt-deps`` installs it)::

    make serve                                          # terminal 1: the server and its training worker
    .venv/bin/python examples/fashion_mnist_stream.py   # terminal 2 (add --help for the options)

Uploads carry an ``Idempotency-Key`` made from the stream arguments and the task index, so running the script again
with the same arguments after a crash picks up the tasks the server already has instead of creating new ones.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image
from tqdm import tqdm

from bench.datasets import Task, TaskStream, make_stream, png_bytes, write_imagefolder_zip

STREAM = "fmnist5"
POLL_S = 0.5  # how often task status and the served model version are polled
MAX_RETRIES = 20  # answers with Retry-After (429, 503) retried before giving up
HTTP_TIMEOUT_S = 120.0  # one request; /predict can be slow on a CPU that is also training
START_FRESH = "stop the server and start it on an empty data dir, e.g. `care-serve serve --data-dir /tmp/care-fresh`"


class StreamError(Exception):
    """Anything that stops the script; the message says what happened and what to do."""


class ApiError(StreamError):
    """An error answer of the server, from its envelope {"error": {"code", "message", "details"}}."""

    def __init__(self, response: httpx.Response) -> None:
        try:
            error = response.json()["error"]
            self.code, message, self.details = str(error["code"]), str(error["message"]), error.get("details") or {}
        except (ValueError, KeyError, TypeError):  # not our envelope (a proxy, a crash): show the raw text
            self.code, message, self.details = "http_error", response.text[:500] or response.reason_phrase, {}
        self.status = response.status_code
        super().__init__(
            f"{response.request.method} {response.request.url.path} -> {self.status} {self.code}: {message}"
        )


@dataclass(frozen=True)
class Options:
    seed: int = 0
    train_per_class: int = 100
    batch: int = 16
    timeout: float = 900.0
    archive: bool = False
    admin_token: str | None = None
    api_key: str | None = None
    poll_s: float = POLL_S


@dataclass(frozen=True)
class StageResult:
    task_number: int
    classes: list[str]
    seen_classes: int
    n: int
    accuracy: float
    per_task: list[float]
    model_version: int


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request; waits out 429/503 answers that carry Retry-After; raises ApiError on any other error answer."""
    for _ in range(MAX_RETRIES):
        try:
            response = client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise StreamError(
                f"{method} {path}: no answer from {client.base_url} within {client.timeout.read}s"
            ) from exc
        except httpx.TransportError as exc:
            raise StreamError(
                f"cannot reach {client.base_url} ({type(exc).__name__}: {exc}); is the server running? start it "
                "with `make serve` (re-running this script is safe: uploads are idempotent)"
            ) from exc
        retry_after = response.headers.get("retry-after")
        if response.status_code in (429, 503) and retry_after is not None:
            delay = min(float(retry_after), 30.0) if retry_after.isdigit() else 5.0
            tqdm.write(f"server busy ({ApiError(response).code}), retrying {method} {path} in {delay:g}s")
            time.sleep(delay)
            continue
        if response.is_error:
            raise ApiError(response)
        return response
    raise StreamError(f"{method} {path}: the server stayed busy after {MAX_RETRIES} retries; try again later")


def auth(token: str | None, header: str) -> dict[str, str]:
    if token is None:
        return {}
    return {header: f"Bearer {token}" if header == "Authorization" else token}


def idempotency_key(options: Options, task: Task) -> str:
    return f"{STREAM}-seed{options.seed}-train{options.train_per_class}-task{task.index}"


def upload_task(client: httpx.Client, task: Task, options: Options) -> dict[str, Any]:
    """POST /tasks with the task's training images (multipart images + labels, or a zip ImageFolder)."""
    name = f"{STREAM} task {task.index + 1}: {', '.join(task.classes)}"
    if options.archive:
        buffer = io.BytesIO()
        write_imagefolder_zip(task, buffer)
        files: list[tuple[str, tuple[str, bytes, str]]] = [
            ("archive", ("task.zip", buffer.getvalue(), "application/zip"))
        ]
        data: dict[str, Any] = {"name": name}
    else:
        files = [("images", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(task.train_images)]
        data = {"labels": list(task.train_labels), "name": name}
    headers = {"Idempotency-Key": idempotency_key(options, task), **auth(options.admin_token, "Authorization")}
    try:
        accepted: dict[str, Any] = call(client, "POST", "/tasks", files=files, data=data, headers=headers).json()
        return accepted
    except ApiError as error:
        if error.code != "label_exists":
            raise
        known = ", ".join(error.details.get("labels") or task.classes)
        raise StreamError(
            f"{error}\nThe server already knows the classes {known}: this script (or another client) taught them "
            "before, with other arguments (--seed, --train-per-class), to the same data dir. Re-running with the "
            f"same arguments resumes instead. To start fresh, {START_FRESH}."
        ) from error


def wait_for_task(client: httpx.Client, task_id: str, options: Options, label: str) -> dict[str, Any]:
    """Poll GET /tasks/{id} with a progress bar until the task is ready; StreamError if it fails or times out."""
    deadline = time.monotonic() + options.timeout
    headers = auth(options.admin_token, "Authorization")
    with tqdm(total=1, desc=f"{label} queued", unit="step", leave=False) as bar:
        while True:
            task: dict[str, Any] = call(client, "GET", f"/tasks/{task_id}", headers=headers).json()
            progress = task.get("progress") or {}
            if progress.get("steps"):  # the "align" stage reports 0 steps: keep the bar where it is
                if bar.total != progress["steps"] or progress["step"] < bar.n:  # a new stage restarts the count
                    bar.reset(total=progress["steps"])
                bar.n = progress["step"]
            if progress:
                bar.set_postfix(epoch=f"{progress.get('epoch')}/{progress.get('epochs')}", loss=progress.get("loss"))
            stage = progress.get("stage") if task["status"] == "training" else None
            bar.set_description(f"{label} {stage or task['status']}")
            if task["status"] == "ready":
                bar.n = bar.total
                bar.refresh()
                return task
            if task["status"] == "failed":
                raise StreamError(
                    f"task {task_id} failed on the server: {task.get('error')}\nThe model is unchanged. A re-run with "
                    f"the same arguments gets this failed task back (same Idempotency-Key); to retry, {START_FRESH}."
                )
            if time.monotonic() > deadline:
                raise StreamError(f"task {task_id} is still {task['status']} after {options.timeout:g}s (--timeout)")
            bar.refresh()
            time.sleep(options.poll_s)


def wait_for_model(client: httpx.Client, version: int, options: Options) -> int:
    """Wait until GET /model serves `version` or later (the server hot-loads it within its poll interval)."""
    deadline = time.monotonic() + options.timeout
    while (served := call(client, "GET", "/model").json().get("model_version")) is None or served < version:
        if time.monotonic() > deadline:
            raise StreamError(
                f"the server still serves model version {served}, not {version}, after {options.timeout:g}s"
            )
        time.sleep(options.poll_s)
    return int(served)


def predict_top1(client: httpx.Client, images: Sequence[Image.Image], options: Options) -> tuple[list[str], int]:
    """Top-1 label of every image via POST /predict in batches; also the oldest model version that answered."""
    labels: list[str] = []
    versions: list[int] = []
    headers = auth(options.api_key, "X-API-Key")
    with tqdm(total=len(images), desc="evaluating", unit="img", leave=False) as bar:
        for start in range(0, len(images), options.batch):
            chunk = images[start : start + options.batch]
            files = [("images", (f"{start + i}.png", png_bytes(image), "image/png")) for i, image in enumerate(chunk)]
            body = call(client, "POST", "/predict", params={"top_k": 1}, files=files, headers=headers).json()
            if len(body["predictions"]) != len(chunk):
                raise StreamError(f"/predict answered {len(body['predictions'])} predictions for {len(chunk)} images")
            labels.extend(prediction["top"][0]["label"] for prediction in body["predictions"])
            versions.append(body["model_version"])
            bar.update(len(chunk))
    return labels, min(versions)


def accuracy(predicted: Sequence[str], expected: Sequence[str]) -> float:
    return sum(p == e for p, e in zip(predicted, expected, strict=True)) / max(1, len(expected))


def evaluate(client: httpx.Client, stream: TaskStream, k: int, options: Options) -> StageResult:
    """Top-1 accuracy on the test images of tasks 0..k, overall and per task."""
    test = stream.seen_test_data(k)
    predicted, version = predict_top1(client, test.images, options)
    bounds = list(itertools.accumulate((len(task.test_labels) for task in stream.tasks[: k + 1]), initial=0))
    per_task = [accuracy(predicted[a:b], test.labels[a:b]) for a, b in itertools.pairwise(bounds)]
    overall = accuracy(predicted, test.labels)
    return StageResult(k + 1, stream[k].classes, len(set(test.labels)), len(test.labels), overall, per_task, version)


def run_stream(client: httpx.Client, stream: TaskStream, options: Options) -> list[StageResult]:
    """Teach the server every task of `stream` in turn and evaluate on all classes seen so far after each."""
    call(client, "GET", "/readyz")  # fails early with a clear message when no server is listening
    results: list[StageResult] = []
    for task in stream:
        label = f"task {task.index + 1}/{len(stream)}"
        accepted = upload_task(client, task, options)
        status = accepted["status"]
        note = "an earlier run sent it" if status != "queued" else f"{accepted.get('position', 0)} task(s) ahead"
        tqdm.write(
            f"{label}: {accepted['num_images']} images of {', '.join(accepted['classes'])} -> "
            f"{accepted['task_id']} ({status}, {note})"
        )
        done = wait_for_task(client, accepted["task_id"], options, label)
        wait_for_model(client, int(done["model_version"]), options)
        result = evaluate(client, stream, task.index, options)
        results.append(result)
        print(
            f"after {label} (classes: {', '.join(task.classes)}): accuracy on {result.seen_classes} seen classes = "
            f"{result.accuracy:.3f} (n={result.n}), model version {result.model_version}"
        )
        print("  per task: " + ", ".join(f"task {i + 1} {acc:.3f}" for i, acc in enumerate(result.per_task)))
        if result.model_version > done["model_version"]:
            print(
                f"  ({label} was learned before as version {done['model_version']}; the server already serves "
                f"a later model, so this measures that model)"
            )
    return results


def print_summary(results: Sequence[StageResult], num_tasks: int) -> None:
    print(f"\n{'stage':<10} {'new classes':<24} {'seen':>4} {'n':>6} {'accuracy':>8} {'version':>7}")
    for r in results:
        print(
            f"{f'task {r.task_number}/{num_tasks}':<10} {', '.join(r.classes):<24} {r.seen_classes:>4} {r.n:>6} "
            f"{r.accuracy:>8.3f} {r.model_version:>7}"
        )
    if results:
        print(f"average incremental accuracy: {sum(r.accuracy for r in results) / len(results):.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the server")
    parser.add_argument("--train-per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class")
    parser.add_argument("--seed", type=int, default=0, help="picks the class order and the images")
    parser.add_argument("--admin-token", help="sent as 'Authorization: Bearer' to /tasks (CARE_ADMIN_TOKEN)")
    parser.add_argument("--api-key", help="sent as 'X-API-Key' to /predict (CARE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the training of one task")
    parser.add_argument("--batch", type=int, default=16, help="images per /predict request")
    parser.add_argument("--archive", action="store_true", help="upload each task as a zip ImageFolder")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.train_per_class < 1 or args.test_per_class < 1:
        parser.error("--batch, --train-per-class and --test-per-class must be at least 1")
    options = Options(
        args.seed, args.train_per_class, args.batch, args.timeout, args.archive, args.admin_token, args.api_key
    )
    try:
        stream = make_stream(
            STREAM, seed=args.seed, train_per_class=args.train_per_class, test_per_class=args.test_per_class
        )
    except (FileNotFoundError, ValueError) as error:  # the Debian package is missing, or too many images per class
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        with httpx.Client(base_url=args.url, timeout=HTTP_TIMEOUT_S) as client:
            results = run_stream(client, stream, options)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; re-running with the same arguments resumes where the server is", file=sys.stderr)
        return 130
    print_summary(results, len(stream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
