"""The app and its worker with the job store on PostgreSQL (a real server on loopback): CARE_JOBS_URL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from service.training.worker import TrainingWorker
from tests.postgres import PostgresServer

from .conftest import png, task_files, updated, wait_for, wait_ready

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(settings: Settings, postgres: PostgresServer) -> Iterator[Settings]:
    with postgres.database() as url:
        yield updated(settings, jobs_url=url)


def test_tasks_queued_through_one_server_are_trained_and_seen_by_another(
    settings: Settings,
    client: TestClient,
    worker: TrainingWorker,
    client_factory: Callable[[Settings], TestClient],
    tmp_path: Path,
) -> None:
    assert worker.jobs.database.kind == "postgresql"
    files, labels = task_files(["red", "green"])
    key = {"Idempotency-Key": "first-task"}
    accepted = client.post("/tasks", files=files, data={"labels": labels}, headers=key)
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    assert wait_ready(client, task_id)["status"] == "ready"
    wait_for(lambda: client.get("/model").json()["model_version"] == 1)
    answer = client.post("/predict", content=png((200, 30, 30)), headers={"content-type": "image/png"})
    assert answer.status_code == 200 and answer.json()["model_version"] == 1
    assert not settings.jobs_db.exists()  # the rows are in PostgreSQL, not in the data directory

    # Another server with its own data directory reads the same jobs: the task, its idempotency key, its labels.
    other = client_factory(updated(settings, data_dir=tmp_path / "other-host"))
    seen = other.get(f"/tasks/{task_id}")
    assert seen.status_code == 200 and seen.json()["status"] == "ready"
    retry = other.post("/tasks", files=files, data={"labels": labels}, headers=key)
    assert retry.status_code in (200, 202) and retry.json()["task_id"] == task_id, retry.text
    files2, labels2 = task_files(["green", "blue"])
    conflict = other.post("/tasks", files=files2, data={"labels": labels2})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "label_exists", conflict.text
