"""Fixtures for app-level tests: a real app (lifespan included) on a temp data dir, and an in-process worker."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from service.training.worker import TrainingWorker


def png(color: tuple[int, int, int], size: int = 24, seed: int = 0) -> bytes:
    """A small PNG: a coloured square with a seed-dependent dot, so images of one class differ a little."""
    image = Image.new("RGB", (size, size), color)
    image.putpixel((seed % size, (seed * 7) % size), (255 - color[0], 255 - color[1], 255 - color[2]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def task_files(labels: list[str], per_class: int = 3) -> tuple[list[tuple[str, tuple[str, bytes, str]]], list[str]]:
    """Multipart `images` parts and their labels for a task of the given classes."""
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    files, sent = [], []
    for class_index, label in enumerate(labels):
        for k in range(per_class):
            color = colors[class_index % len(colors)]
            files.append(("images", (f"{label}-{k}.png", png(color, seed=k), "image/png")))
            sent.append(label)
    return files, sent


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        backbone="test_vit",
        backbone_weights="random",
        image_size=32,
        train_epochs=1,
        train_batch_size=8,
        align_epochs=1,
        poll_interval_s=0.05,
        worker_poll_s=0.05,
        run_worker=False,
        serve_threads=1,
        train_threads=1,
        max_batch_wait_ms=1,
        provisional=False,  # one version per trained task; tests/integration/test_provisional.py turns it on
    )


def updated(settings: Settings, **changes: object) -> Settings:
    """A validated copy of `settings` with `changes` (model_copy would skip validation, e.g. of secrets)."""
    return Settings.model_validate({**settings.model_dump(), **changes})


@pytest.fixture
def client_factory() -> Iterator[Callable[[Settings], TestClient]]:
    clients: list[TestClient] = []

    def make(settings: Settings) -> TestClient:
        client = TestClient(create_app(settings, start_worker=False), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(settings: Settings, client_factory: Callable[[Settings], TestClient]) -> TestClient:
    return client_factory(settings)


@pytest.fixture
def worker(settings: Settings) -> Iterator[TrainingWorker]:
    """A training worker running in a thread of the test process (the same code as `care-serve worker`)."""
    training = TrainingWorker(settings)
    thread = threading.Thread(target=training.run, daemon=True)
    thread.start()
    yield training
    training.stop_event.set()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the worker did not stop"


def wait_for(check: Callable[[], Any], timeout_s: float = 60.0, interval_s: float = 0.05) -> Any:
    """Poll until `check()` is truthy; fail after `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def wait_ready(client: TestClient | httpx.Client, task_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/tasks/{task_id}").json()
        return body if body["status"] in ("ready", "failed") else None

    result: dict[str, Any] = wait_for(done, timeout_s)
    return result
