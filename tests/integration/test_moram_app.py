"""MoRAM through the service (issue 15): CARE_METHOD=moram trains tasks posted over HTTP with the worker's code,
publishes them as `atoms` files (no routers, no shared expert), serves them and reloads them from the registry; a
server of the other method refuses that registry."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from fastapi.testclient import TestClient

from registry import IncompatibleArtifact, Registry
from service.settings import Settings
from service.training.worker import TrainingWorker
from tests.integration.conftest import png, task_files, updated, wait_for, wait_ready

IMAGES = [
    ("images", ("a.png", png((200, 30, 30), seed=5), "image/png")),
    ("images", ("b.png", png((30, 30, 200), seed=6), "image/png")),
    ("images", ("c.png", png((9, 9, 9)), "image/png")),
]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Few atoms: test_vit's sites are 64 wide; k = 4 of the 8 atoms two tasks give each site.
    return updated(settings, method="moram", moram_rank=4, moram_top_k=4)


def predict(client: TestClient) -> list[dict[str, float]]:
    response = client.post("/predict?top_k=10", files=IMAGES)
    assert response.status_code == 200, response.text
    return [{p["label"]: p["score"] for p in row["top"]} for row in response.json()["predictions"]]


def test_moram_tasks_are_trained_served_and_reloaded_from_the_registry(
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

    manifest = Registry.from_path(settings.registry_dir).load_manifest(2)
    assert manifest.model_cfg["method"] == "moram" and manifest.model_cfg["moram_rank"] == 4
    assert [set(task.files) for task in manifest.tasks] == [{"atoms"}, {"atoms"}]
    assert set(manifest.version_files) == {"classifier"}  # no shared expert
    # Version 2 reuses version 1's atoms file for the first task (files are appended, never rewritten).
    assert manifest.tasks[0] == Registry.from_path(settings.registry_dir).load_manifest(1).tasks[0]

    served = predict(client)
    for row in served:
        assert set(row) == {"red", "green", "blue", "yellow"}
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-4)
    assert client.get("/model").json()["router_cache"]["resident_routers"] == 0  # MoRAM has no routers

    # A fresh server on the same data directory loads the same version from the registry and answers the same.
    again = client_factory(settings)
    assert again.get("/model").json()["model_version"] == 2
    for before, after in zip(served, predict(again), strict=True):
        assert before.keys() == after.keys()
        for label, score in before.items():
            assert after[label] == pytest.approx(score, abs=1e-5)

    # A CaRE server, or worker, refuses the MoRAM registry at start-up, naming the method.
    care = updated(settings, method="care", moram_rank=16, moram_top_k=16)
    with pytest.raises(IncompatibleArtifact, match='method: registry has "moram"'):
        client_factory(care)
    with pytest.raises(IncompatibleArtifact, match='method: registry has "moram"'):
        TrainingWorker(care)


def test_moram_tasks_are_provisional_before_training_with_features_from_the_moram_network(
    settings: Settings, client_factory: Callable[[Settings], TestClient]
) -> None:
    from model import artifacts
    from model.head import HeadStatistics
    from model.moram import MoramModel
    from service.modelstore import provisional_tasks
    from service.training.provisional import served_inputs
    from service.training.worker import LEASE

    # The worker is driven by hand and never renews its lease: a long lease, so a loaded machine cannot expire it
    # between two claims (as in test_provisional).
    settings = updated(settings, provisional=True, worker_lease_ttl_s=3600)
    client = client_factory(settings)
    worker = TrainingWorker(settings)
    assert worker._acquire()

    def post(labels: list[str]) -> str:
        files, sent = task_files(labels)
        response = client.post("/tasks", files=files, data={"labels": sent})
        assert response.status_code == 202, response.text
        task_id: str = response.json()["task_id"]
        return task_id

    def train_next() -> str:
        job = worker.jobs.claim_next(worker.owner, lease=LEASE)
        assert job is not None
        worker.process(job)
        return job.task_id

    first = post(["a0", "a1"])
    assert train_next() == first
    second, third = post(["b0", "b1"]), post(["c0"])
    assert worker._make_provisional()  # versions 2 and 3: the second, then the third task provisional
    wait_for(lambda: client.get("/model").json()["model_version"] == 3, timeout_s=30)
    answer = client.post("/predict?top_k=5", files=IMAGES[:1]).json()
    flags = {entry["label"]: entry["provisional"] for entry in answer["predictions"][0]["top"]}
    assert flags == {"a0": False, "a1": False, "b0": True, "b1": True, "c0": True}

    # Training the second task keeps the third provisional, its statistics re-read through version 4's atoms.
    assert train_next() == second
    trained = worker.registry.latest_manifest()
    assert trained is not None and trained.version == 4
    assert [t.task_id for t in trained.tasks] == [first, second]
    assert [t.task_id for t in provisional_tasks(trained)] == [third]
    network, routers, loaded = worker._served(trained)
    assert isinstance(network, MoramModel) and network.num_tasks == 2 and loaded.head is not None
    state = worker.registry.load_trainer_state(4)
    assert state is not None
    full = HeadStatistics.from_tensors(artifacts.trainer_state_from_tensors(state.tensors, "provisional"))
    images, _ = worker._task_tensors(third, ("c0",))
    inputs = served_inputs(network, routers, images).double() * loaded.head.scale.double()
    torch.testing.assert_close(full.class_sums[4], inputs.sum(dim=0), rtol=1e-5, atol=1e-5)
    wait_for(lambda: client.get("/model").json()["model_version"] == 4, timeout_s=30)
    assert client.get("/model").json()["num_provisional_classes"] == 1
