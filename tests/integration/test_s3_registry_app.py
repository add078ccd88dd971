"""The app and its worker on a registry in S3-compatible storage (moto's server on loopback): CARE_REGISTRY_URL."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from service.training.worker import TrainingWorker

from .conftest import png, task_files, updated, wait_for, wait_ready

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from registry.s3 import S3Backend  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(settings: Settings, s3_endpoint: str) -> Settings:
    bucket = f"care-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return updated(settings, registry_url=f"s3://{bucket}/registry", registry_endpoint_url=s3_endpoint)


def test_a_task_learned_into_s3_is_served_by_a_server_on_another_host(
    settings: Settings,
    client: TestClient,
    worker: TrainingWorker,
    client_factory: Callable[[Settings], TestClient],
    tmp_path: Path,
) -> None:
    assert isinstance(worker.registry.backend, S3Backend)
    files, labels = task_files(["red", "green"])
    accepted = client.post("/tasks", files=files, data={"labels": labels})
    assert accepted.status_code == 202, accepted.text
    assert wait_ready(client, accepted.json()["task_id"])["status"] == "ready"
    wait_for(lambda: client.get("/model").json()["model_version"] == 1)
    answer = client.post("/predict", content=png((200, 30, 30)), headers={"content-type": "image/png"})
    assert answer.status_code == 200 and answer.json()["model_version"] == 1

    # Nothing of the registry is in the data directory but the cache; the bucket holds the version.
    assert not settings.registry_dir.exists()
    assert settings.registry_cache_dir.is_dir()
    backend = worker.registry.backend
    current = backend.client.get_object(Bucket=backend.bucket, Key="registry/CURRENT")
    assert current["Body"].read() == b"1\n"

    # A server with its own, empty data directory (another host) serves the same version from the bucket.
    other = client_factory(updated(settings, data_dir=tmp_path / "other-host"))
    assert other.get("/model").json()["model_version"] == 1
    again = other.post("/predict", content=png((200, 30, 30)), headers={"content-type": "image/png"})
    assert again.status_code == 200 and again.json()["predictions"] == answer.json()["predictions"]
