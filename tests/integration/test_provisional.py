"""Provisional versions: queued tasks served by the closed-form head before training, then replaced by training.

The worker is driven step by step in the test's thread (the same methods its loop calls), so every version it
publishes can be inspected: which tasks are trained, which are provisional, and what statistics each holds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from model import artifacts
from model.head import HeadStatistics
from service.modelstore import EXTRA_HEAD_STATE, head_state_version, provisional_tasks
from service.settings import Settings
from service.training.provisional import served_inputs
from service.training.worker import LEASE, TrainingWorker
from tests.integration.conftest import png, task_files, updated, wait_for

pytestmark = pytest.mark.timeout(300)


def post(client: TestClient, labels: list[str]) -> str:
    files, sent = task_files(labels, per_class=3)
    response = client.post("/tasks", files=files, data={"labels": sent})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def train_next(worker: TrainingWorker) -> str:
    task = worker.jobs.claim_next(worker.owner, lease=LEASE)
    assert task is not None
    worker.process(task)
    return task.task_id


def served_version(client: TestClient, version: int) -> dict[str, Any]:
    wait_for(lambda: client.get("/model").json()["model_version"] == version, timeout_s=30)
    body: dict[str, Any] = client.get("/model").json()
    return body


def trainer_state(worker: TrainingWorker, version: int, prefix: str) -> HeadStatistics:
    state = worker.registry.load_trainer_state(version)
    assert state is not None
    return HeadStatistics.from_tensors(artifacts.trainer_state_from_tensors(state.tensors, prefix))


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The tests drive the worker by hand, so nothing renews its lease: it must outlast a test on a loaded machine
    # (at the default 30 s, the second claim found the lease expired and returned None while other work ran).
    return updated(settings, provisional=True, worker_lease_ttl_s=3600)


@pytest.fixture
def stepped(settings: Settings) -> TrainingWorker:
    worker = TrainingWorker(settings)
    assert worker._acquire()
    return worker


def test_queued_tasks_become_provisional_in_order_then_training_replaces_them(
    client: TestClient, stepped: TrainingWorker
) -> None:
    worker = stepped
    first = post(client, ["a0", "a1"])
    assert not worker._make_provisional()  # nothing to join yet: the first task defines the feature space
    assert train_next(worker) == first
    second, third = post(client, ["b0", "b1"]), post(client, ["c0"])
    assert client.get(f"/tasks/{second}").json()["provisional"] is False

    assert worker._make_provisional()
    latest = worker.registry.latest_manifest()
    assert latest is not None and latest.version == 3  # one provisional version per task, in submission order
    assert [t.task_id for t in latest.tasks] == [first]
    assert [t.task_id for t in provisional_tasks(latest)] == [second, third]
    assert latest.extra[EXTRA_HEAD_STATE] == 1 and head_state_version(latest) == 1
    assert [t.task_id for t in provisional_tasks(worker.registry.load_manifest(2))] == [second]

    body = served_version(client, 3)
    assert body["num_tasks"] == 1 and body["num_classes"] == 5 and body["num_provisional_classes"] == 3
    assert body["provisional_tasks"] == sorted([second, third])
    for task_id in (second, third):
        record = client.get(f"/tasks/{task_id}").json()
        assert record["status"] == "queued" and record["provisional"] is True and record["served_here"] is False
    answer = client.post("/predict?top_k=5", files=[("images", ("x.png", png((30, 200, 30)), "image/png"))]).json()
    assert answer["model_version"] == 3
    flags = {entry["label"]: entry["provisional"] for entry in answer["predictions"][0]["top"]}
    assert flags == {"a0": False, "a1": False, "b0": True, "b1": True, "c0": True}
    metrics = client.get("/metrics").text
    assert "care_classes_provisional 3.0" in metrics
    assert "care_task_servable_seconds_count 2.0" in metrics  # second and third became servable here

    # The provisional statistics are the trained ones plus the new images' inputs through version 1's network.
    trained = trainer_state(worker, 1, "head")
    full = trainer_state(worker, 3, "provisional")
    assert full.class_counts.tolist() == [3, 3, 3, 3, 3]
    torch.testing.assert_close(full.class_sums[:2], trained.class_sums)
    assert worker._make_provisional() is False  # idempotent: nothing queued lacks a provisional version

    # Training the second task replaces its provisional record; the third stays provisional, re-embedded.
    assert train_next(worker) == second
    trained_version = worker.registry.latest_manifest()
    assert trained_version is not None and trained_version.version == 4
    assert [t.task_id for t in trained_version.tasks] == [first, second]
    assert [t.task_id for t in provisional_tasks(trained_version)] == [third]
    assert EXTRA_HEAD_STATE not in trained_version.extra
    assert client.get(f"/tasks/{second}").json()["status"] == "ready"
    trained4 = trainer_state(worker, 4, "head")
    full4 = trainer_state(worker, 4, "provisional")
    assert trained4.num_classes == 4 and full4.num_classes == 5
    torch.testing.assert_close(full4.class_sums[:4], trained4.class_sums)
    # The third task's statistics are its images' inputs through the trained version 4, not version 1's.
    network, routers, loaded = worker._served(trained_version)
    assert loaded.head is not None
    images, labels = worker._task_tensors(third, ("c0",))
    inputs = served_inputs(network, routers, images).double() * loaded.head.scale.double()
    torch.testing.assert_close(full4.class_sums[4], inputs.sum(dim=0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full4.gram - trained4.gram, inputs.T @ inputs, rtol=1e-5, atol=1e-4)
    assert labels.tolist() == [0, 0, 0]

    # A task whose training fails loses its provisional classes, and its error says so.
    def broken(*_args: object) -> Any:
        raise RuntimeError("training exploded")

    worker._train_and_publish = broken  # type: ignore[method-assign]
    assert train_next(worker) == third
    withdrawn = worker.registry.latest_manifest()
    assert withdrawn is not None and withdrawn.version == 5 and provisional_tasks(withdrawn) == []
    assert [t.task_id for t in withdrawn.tasks] == [first, second] and withdrawn.extra[EXTRA_HEAD_STATE] == 4
    record = client.get(f"/tasks/{third}").json()
    assert record["status"] == "failed" and record["provisional"] is False
    assert "provisional classes were withdrawn in version 5" in record["error"]
    body = served_version(client, 5)
    assert body["num_classes"] == 4 and body["num_provisional_classes"] == 0
    # The next version continues from version 4's trained statistics.
    assert worker.store.load_statistics(withdrawn)[1] is not None


def test_a_task_queued_during_training_is_provisional_before_that_training_ends(
    client: TestClient, stepped: TrainingWorker
) -> None:
    worker = stepped
    post(client, ["a0", "a1"])
    train_next(worker)
    second = post(client, ["b0", "b1"])
    assert worker._make_provisional()
    posted: list[str] = []
    progress = worker._progress

    def post_during_training(task_id: str, report: Any) -> None:
        if not posted:
            posted.append(post(client, ["late"]))
        progress(task_id, report)

    worker._progress = post_during_training  # type: ignore[method-assign]
    assert train_next(worker) == second
    assert posted
    versions = [worker.registry.load_manifest(v) for v in range(1, worker.registry.current_version() + 1)]
    # Version 3 made the late task provisional between training steps; version 4 is the trained one, the late task
    # still provisional in it.
    assert len(versions) == 4
    assert [t.task_id for t in provisional_tasks(versions[2])] == [second, posted[0]]
    assert len(versions[2].tasks) == 1
    assert [t.task_id for t in versions[3].tasks][-1] == second
    assert [t.task_id for t in provisional_tasks(versions[3])] == posted
    assert client.get(f"/tasks/{posted[0]}").json()["status"] == "queued"


def test_provisional_off_trains_as_before(settings: Settings, client: TestClient) -> None:
    worker = TrainingWorker(updated(settings, provisional=False))
    assert worker._acquire()
    post(client, ["a0", "a1"])
    train_next(worker)
    post(client, ["b0"])
    assert not worker._make_provisional()
    assert worker.registry.current_version() == 1


def test_a_provisional_head_reads_at_most_the_configured_images_per_class(
    settings: Settings, client: TestClient
) -> None:
    worker = TrainingWorker(updated(settings, provisional_images_per_class=2))
    assert worker._acquire()
    post(client, ["a0", "a1"])
    train_next(worker)
    post(client, ["b0", "b1"])  # three images per class
    assert worker._make_provisional()
    assert trainer_state(worker, 2, "provisional").class_counts.tolist() == [3, 3, 2, 2]
    second = train_next(worker)
    assert client.get(f"/tasks/{second}").json()["status"] == "ready"
    assert trainer_state(worker, 3, "head").class_counts.tolist() == [3, 3, 3, 3]  # training reads every image
