"""SETA through the service (issue 15): CARE_METHOD=seta trains tasks posted over HTTP with the worker's code (the
second continuing from the registry's shared experts and anchor), publishes a shared file per version and one
experts file per task, serves and reloads them; a server of another method refuses that registry."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from model import artifacts
from registry import IncompatibleArtifact, Registry
from service.settings import Settings
from service.training.worker import TrainingWorker
from tests.integration.conftest import png, task_files, updated, wait_for, wait_ready

IMAGES = [
    ("images", ("a.png", png((200, 30, 30), seed=5), "image/png")),
    ("images", ("b.png", png((30, 30, 200), seed=6), "image/png")),
]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return updated(settings, method="seta")


def predict(client: TestClient) -> list[dict[str, float]]:
    response = client.post("/predict?top_k=10", files=IMAGES)
    assert response.status_code == 200, response.text
    return [{p["label"]: p["score"] for p in row["top"]} for row in response.json()["predictions"]]


def test_seta_tasks_are_trained_served_and_reloaded_from_the_registry(
    settings: Settings, client: TestClient, worker: TrainingWorker, client_factory: Callable[[Settings], TestClient]
) -> None:
    task_ids = []
    for labels in (["red", "green"], ["blue", "yellow"]):
        files, sent = task_files(labels)
        accepted = client.post("/tasks", files=files, data={"labels": sent})
        assert accepted.status_code == 202, accepted.text
        task_ids.append(accepted.json()["task_id"])
    for index, task_id in enumerate(task_ids):
        record = wait_ready(client, task_id, timeout_s=300)
        assert record["status"] == "ready", record
        assert record["index"] == index and record["model_version"] == index + 1
    wait_for(lambda: client.get("/model").json()["model_version"] == 2, timeout_s=60)

    registry = Registry.from_path(settings.registry_dir)
    first, second = registry.load_manifest(1), registry.load_manifest(2)
    assert second.model_cfg["method"] == "seta" and "seta_anchor" in second.model_cfg
    assert [set(task.files) for task in second.tasks] == [{"experts"}, {"experts"}]
    # The shared experts moved with the second task: each version has its own file; task files are never rewritten.
    assert first.version_files["shared"] != second.version_files["shared"]
    assert second.tasks[0] == first.tasks[0]
    for version in (1, 2):  # every version keeps the anchor's importance beside the head statistics
        state = registry.load_trainer_state(version)
        assert state is not None and any(k.startswith(artifacts.SETA_IMPORTANCE) for k in state.tensors)
    assert second.extra["task_metrics"]["shared_drift"] > 0

    served = predict(client)
    for row in served:
        assert set(row) == {"red", "green", "blue", "yellow"}
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-4)
    assert client.get("/model").json()["router_cache"]["resident_routers"] == 0  # the gate is resident

    again = client_factory(settings)
    assert again.get("/model").json()["model_version"] == 2
    for before, after in zip(served, predict(again), strict=True):
        assert before.keys() == after.keys()
        for label, score in before.items():
            assert after[label] == pytest.approx(score, abs=1e-5)

    for other in (updated(settings, method="care"), updated(settings, method="moram")):
        with pytest.raises(IncompatibleArtifact, match='method: registry has "seta"'):
            client_factory(other)
        with pytest.raises(IncompatibleArtifact, match='method: registry has "seta"'):
            TrainingWorker(other)
