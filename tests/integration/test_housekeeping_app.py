"""Housekeeping in the running app: the start-up sweep, care_data_dir_bytes, and uploads gone once tasks are ready.

The app is the real one (lifespan, SQLite job store, registry); the worker is the real worker code in a thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from service.training.worker import TrainingWorker
from tests.integration.conftest import task_files, updated, wait_ready


def data_dir_bytes(client: TestClient) -> dict[str, float]:
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    return {s.labels["kind"]: s.value for s in families["care_data_dir_bytes"].samples}


def old_leftovers(settings: Settings) -> list[Path]:
    staging = settings.uploads_dir / ".staging-0011223344556677"
    (staging / "images").mkdir(parents=True)
    (staging / "images" / "000000.bin").write_bytes(b"z" * 3000)
    temp = settings.registry_dir / "manifests" / ".000001.json.0123456789abcdef0123456789abcdef.tmp"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(b"{")
    hour_ago = time.time() - 3600
    for path in (staging / "images" / "000000.bin", staging / "images", staging, temp):
        os.utime(path, (hour_ago, hour_ago))
    return [staging, temp]


def test_restart_sweeps_crash_leftovers_and_the_gauge_shows_it(
    settings: Settings, client_factory: Callable[[Settings], TestClient]
) -> None:
    settings.uploads_dir.mkdir(parents=True)
    leftovers = old_leftovers(settings)
    client = client_factory(settings)
    assert not any(path.exists() for path in leftovers)
    assert client.app.state.housekeeper.sweeps == 1  # type: ignore[attr-defined]
    usage = data_dir_bytes(client)
    assert set(usage) == {"registry", "uploads", "staging", "jobs_db"}
    assert usage["staging"] == 0 and usage["uploads"] == 0 and usage["jobs_db"] > 0


def run_worker(settings: Settings) -> tuple[TrainingWorker, threading.Thread]:
    worker = TrainingWorker(settings)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


def test_upload_is_deleted_once_ready_unless_kept(
    settings: Settings, client_factory: Callable[[Settings], TestClient]
) -> None:
    for keep in (False, True):
        current = updated(settings, keep_uploads=keep, data_dir=settings.data_dir / f"keep-{keep}")
        client = client_factory(current)
        files, labels = task_files([f"k{keep}-a", f"k{keep}-b"])
        task_id = client.post("/tasks", files=files, data={"labels": labels}).json()["task_id"]
        upload = current.uploads_dir / task_id
        assert upload.is_dir()
        client.app.state.housekeeper.sweep()  # type: ignore[attr-defined]
        queued_bytes = data_dir_bytes(client)["uploads"]
        assert queued_bytes >= sum(len(f[1][1]) for f in files)

        worker, thread = run_worker(current)
        try:
            assert wait_ready(client, task_id)["status"] == "ready"
        finally:
            worker.stop_event.set()
            thread.join(timeout=60)
        assert upload.exists() is keep
        client.app.state.housekeeper.sweep()  # type: ignore[attr-defined]
        assert upload.exists() is keep, "a sweep keeps what CARE_KEEP_UPLOADS keeps"
        assert (data_dir_bytes(client)["uploads"] == queued_bytes) is keep
        assert data_dir_bytes(client)["registry"] > 0
