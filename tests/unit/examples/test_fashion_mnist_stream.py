"""Tests of examples/fashion_mnist_stream.py against a fake server on httpx.MockTransport (no real server, fast).

The fake follows docs/api.md closely enough for the client: multipart or archive uploads to /tasks with
Idempotency-Key, a task that goes queued -> training (adapt, align) -> ready or failed over a few polls, a /model that
lags behind a newly published version, and a /predict that reads the class from the red channel of each image.
"""

from __future__ import annotations

import email
import email.policy
import importlib.util
import io
import socket
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from PIL import Image

from bench.datasets import FASHION_MNIST_DIR, Split, Task, TaskStream

SCRIPT = Path(__file__).resolve().parents[3] / "examples" / "fashion_mnist_stream.py"
LABELS = ("a", "b", "c", "d")  # class i is drawn with red = 10 * i


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fashion_mnist_stream", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fms = _load_script()


def _image(label: str) -> Image.Image:
    return Image.new("RGB", (4, 4), (10 * LABELS.index(label), 0, 0))


def _stream() -> TaskStream:
    """2 tasks x 2 classes, 3 train / 4 test images per class; some test images look like another class.

    Task 1 test: one 'b' looks like 'a' (7/8). Task 2 test: one 'c' and one 'd' look like 'a' (6/8).
    """
    drawn_as = {("b", 0): "a", ("c", 1): "a", ("d", 2): "a"}
    tasks = []
    for index, classes in enumerate((("a", "b"), ("c", "d"))):
        train = Split([_image(c) for c in classes for _ in range(3)], [c for c in classes for _ in range(3)])
        test_labels = [c for c in classes for _ in range(4)]
        test_images = [_image(drawn_as.get((c, i % 4), c)) for i, c in enumerate(test_labels)]
        tasks.append(Task(index, classes, train=train, test=Split(test_images, test_labels)))
    return TaskStream("synthetic", 0, tuple(tasks))


def _parts(request: httpx.Request) -> list[tuple[str, str | None, bytes]]:
    """(name, filename, payload) of every multipart part, in order."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + request.read(), policy=email.policy.HTTP)
    parts: list[tuple[str, str | None, bytes]] = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        parts.append((str(part.get_param("name", header="content-disposition")), part.get_filename(), payload))
    return parts


def _error(status: int, code: str, message: str, details: Any = None, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"code": code, "message": message, "details": details or {}}}, headers=headers
    )


@dataclass
class FakeServer:
    polls_to_ready: int = 3  # GET /tasks/{id} answers before "ready" (first "training" adapt, then align)
    model_lag: int = 2  # GET /model answers still giving the old version after a task is ready
    fail_with: str | None = None  # make every task fail with this error
    busy: int = 0  # 429 queue_full answers to POST /tasks before accepting
    known: set[str] = field(default_factory=set)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    predicts: list[dict[str, Any]] = field(default_factory=list)
    polls: dict[str, int] = field(default_factory=dict)
    version: int = 0
    served: int = 0
    lag_left: int = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/readyz":
            return httpx.Response(200, json={"status": "ready", "model_version": self.served or None})
        if path == "/tasks" and request.method == "POST":
            return self.submit(request)
        if path.startswith("/tasks/"):
            return self.poll(path.removeprefix("/tasks/"))
        if path == "/model":
            if self.lag_left:
                self.lag_left -= 1
            else:
                self.served = self.version
            return httpx.Response(200, json={"model_version": self.served or None, "num_classes": len(self.known)})
        if path == "/predict":
            return self.predict(request)
        return _error(404, "not_found", f"no route {path}")

    def submit(self, request: httpx.Request) -> httpx.Response:
        parts = _parts(request)
        key = request.headers.get("idempotency-key")
        self.uploads.append({"parts": parts, "key": key, "authorization": request.headers.get("authorization")})
        if self.busy:
            self.busy -= 1
            return _error(429, "queue_full", "too many tasks waiting; retry later", **{"Retry-After": "0"})
        if key in self.keys:
            task = self.tasks[self.keys[key]]
            return httpx.Response(202, json={**task, "position": 0})
        archives = [data for name, _, data in parts if name == "archive"]
        if archives:
            with zipfile.ZipFile(io.BytesIO(archives[0])) as archive:
                labels = [member.split("/")[0] for member in archive.namelist()]
        else:
            labels = [data.decode() for name, _, data in parts if name == "labels"]
        classes = list(dict.fromkeys(labels))
        if clash := sorted(self.known.intersection(classes)):
            return _error(409, "label_exists", f"already learned: {', '.join(clash)}", {"labels": clash})
        self.known.update(classes)
        task_id = f"t-{len(self.tasks)}"
        self.tasks[task_id] = {
            "task_id": task_id,
            "status": "queued",
            "classes": classes,
            "num_images": len(labels),
            "progress": None,
            "model_version": None,
            "error": None,
        }
        if key is not None:
            self.keys[key] = task_id
        return httpx.Response(
            202, json={**self.tasks[task_id], "position": 0}, headers={"Location": f"/tasks/{task_id}"}
        )

    def poll(self, task_id: str) -> httpx.Response:
        task = self.tasks.get(task_id)
        if task is None:
            return _error(404, "task_not_found", f"no task {task_id!r}")
        self.polls[task_id] = polls = self.polls.get(task_id, 0) + 1
        if task["status"] in ("queued", "training") and polls >= self.polls_to_ready:
            if self.fail_with is not None:
                task.update(status="failed", error=self.fail_with)
                self.known.difference_update(task["classes"])
            else:
                self.version += 1
                self.lag_left = self.model_lag
                task.update(status="ready", model_version=self.version)
        elif task["status"] in ("queued", "training"):
            stage, step, steps = ("adapt", 2, 4) if polls == 1 else ("align", 0, 0)
            task.update(
                status="training",
                progress={"stage": stage, "epoch": 1, "epochs": 1, "step": step, "steps": steps, "loss": 0.5},
            )
        return httpx.Response(200, json=task)

    def predict(self, request: httpx.Request) -> httpx.Response:
        if not self.served:
            return _error(503, "no_classes", "nothing learned yet", **{"Retry-After": "5"})
        images = [Image.open(io.BytesIO(data)) for name, _, data in _parts(request) if name == "images"]
        top = [LABELS[image.convert("RGB").getpixel((0, 0))[0] // 10] for image in images]  # type: ignore[index]
        self.predicts.append(
            {
                "n": len(images),
                "top_k": request.url.params.get("top_k"),
                "api_key": request.headers.get("x-api-key"),
                "version": self.served,
            }
        )
        rows = [{"top": [{"label": label, "score": 1.0, "task_id": "t-0"}]} for label in top]
        return httpx.Response(200, json={"model_version": self.served, "predictions": rows})


def _client(server: FakeServer) -> httpx.Client:
    return httpx.Client(base_url="http://fake", transport=httpx.MockTransport(server))


OPTIONS = fms.Options(seed=7, train_per_class=3, batch=3, timeout=10.0, admin_token="adm", api_key="key", poll_s=0.0)


def test_full_run_uploads_polls_waits_for_the_model_and_measures_accuracy() -> None:
    server = FakeServer()
    with _client(server) as client:
        results = fms.run_stream(client, _stream(), OPTIONS)

    # Multipart: one `images` PNG part and one `labels` field per image, same order, plus a name.
    assert len(server.uploads) == 2
    first = server.uploads[0]["parts"]
    images = [(filename, data) for name, filename, data in first if name == "images"]
    assert [data.decode() for name, _, data in first if name == "labels"] == ["a"] * 3 + ["b"] * 3
    assert len(images) == 6 and all(data.startswith(b"\x89PNG") and filename for filename, data in images)
    assert [data.decode() for name, _, data in first if name == "name"] == ["fmnist5 task 1: a, b"]
    # The idempotency key derives from the seed and the task index; the admin token goes to /tasks only.
    assert [u["key"] for u in server.uploads] == ["fmnist5-seed7-train3-task0", "fmnist5-seed7-train3-task1"]
    assert {u["authorization"] for u in server.uploads} == {"Bearer adm"}

    # Polled to ready, then waited for /model to catch up: every prediction came from the task's version.
    assert server.polls == {"t-0": 3, "t-1": 3}
    assert [t["status"] for t in server.tasks.values()] == ["ready", "ready"]
    assert [p["version"] for p in server.predicts] == [1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert {p["top_k"] for p in server.predicts} == {"1"} and {p["api_key"] for p in server.predicts} == {"key"}
    assert [p["n"] for p in server.predicts] == [3, 3, 2, 3, 3, 3, 3, 3, 1]  # --batch 3 over 8 then 16 images

    assert [(r.task_number, r.classes, r.seen_classes, r.n, r.model_version) for r in results] == [
        (1, ["a", "b"], 2, 8, 1),
        (2, ["c", "d"], 4, 16, 2),
    ]
    assert results[0].accuracy == pytest.approx(7 / 8) and results[0].per_task == pytest.approx([7 / 8])
    assert results[1].accuracy == pytest.approx(13 / 16) and results[1].per_task == pytest.approx([7 / 8, 6 / 8])


def test_rerun_with_the_same_arguments_creates_no_duplicate_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    server = FakeServer()
    with _client(server) as client:
        fms.run_stream(client, _stream(), OPTIONS)
        again = fms.run_stream(client, _stream(), OPTIONS)
    assert list(server.tasks) == ["t-0", "t-1"] and len(server.uploads) == 4
    assert [r.model_version for r in again] == [2, 2]  # the server already serves the last version
    assert "was learned before as version 1" in capsys.readouterr().out


def test_archive_upload_sends_an_imagefolder_zip() -> None:
    server = FakeServer()
    with _client(server) as client:
        task = fms.upload_task(client, _stream()[0], fms.Options(archive=True))
    assert task["classes"] == ["a", "b"] and task["num_images"] == 6
    parts = {name: (filename, data) for name, filename, data in server.uploads[0]["parts"]}
    assert sorted(parts) == ["archive", "name"] and parts["name"][1] == b"fmnist5 task 1: a, b"
    filename, data = parts["archive"]
    assert filename == "task.zip"
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == [f"{c}/{i}.png" for c in "ab" for i in range(3)]
    assert server.uploads[0]["authorization"] is None  # no --admin-token, no header


def test_label_exists_explains_how_to_start_fresh() -> None:
    server = FakeServer(known={"b"})
    with _client(server) as client, pytest.raises(fms.StreamError) as caught:
        fms.run_stream(client, _stream(), OPTIONS)
    message = str(caught.value)
    assert "409 label_exists: already learned: b" in message
    assert "already knows the classes b" in message and "empty data dir" in message
    assert not server.tasks


def test_a_failed_task_stops_with_the_server_error() -> None:
    server = FakeServer(fail_with="training diverged: loss is nan")
    with _client(server) as client, pytest.raises(fms.StreamError, match="training diverged: loss is nan"):
        fms.run_stream(client, _stream(), OPTIONS)
    assert len(server.tasks) == 1 and not server.predicts


def test_queue_full_is_retried_after_retry_after() -> None:
    server = FakeServer(busy=2)
    with _client(server) as client:
        task = fms.upload_task(client, _stream()[0], OPTIONS)
    assert task["task_id"] == "t-0" and len(server.uploads) == 3


def test_error_envelopes_and_other_bodies_read_well() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/predict":
            return _error(413, "too_large", "more than 64 'images' parts", {"limit": 64})
        return httpx.Response(502, text="Bad Gateway")

    with httpx.Client(base_url="http://fake", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(fms.ApiError) as caught:
            fms.call(client, "POST", "/predict")
        assert str(caught.value) == "POST /predict -> 413 too_large: more than 64 'images' parts"
        assert caught.value.details == {"limit": 64}
        with pytest.raises(fms.ApiError, match="GET /model -> 502 http_error: Bad Gateway"):
            fms.call(client, "GET", "/model")


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="no Fashion-MNIST")
def test_main_says_how_to_start_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert fms.main(["--url", f"http://127.0.0.1:{port}", "--train-per-class", "2", "--test-per-class", "2"]) == 1
    assert "is the server running? start it with `make serve`" in capsys.readouterr().err
