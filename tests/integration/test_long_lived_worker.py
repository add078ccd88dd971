"""One worker that keeps learning: 20 tasks of one and several classes, predictions in between, none may fail.

A worker's router cache is shared by every pass it makes: the train-accuracy pass after each task (inference
mode) loads earlier tasks' routers, and the next task's training steps read them with autograd. Before routers
entering the cache were created outside inference mode, every task after the first that selected a cached router
failed with "Inference tensors cannot be saved for backward" (issue 13).
"""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from service.routers.source import CachedRouters
from service.training.worker import TrainingWorker
from tests.integration.conftest import png, task_files, wait_for, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TASKS = 20


def class_count(task: int) -> int:
    """One-class tasks interleaved with two- and three-class ones, as users upload them."""
    return (1, 2, 1, 3, 1)[task % 5]


def test_one_worker_learns_twenty_mixed_tasks_without_a_failure(client: TestClient, worker: TrainingWorker) -> None:
    learned: list[str] = []
    for task in range(TASKS):
        labels = [f"t{task}-c{k}" for k in range(class_count(task))]
        files, sent = task_files(labels, per_class=3)
        accepted = client.post("/tasks", files=files, data={"labels": sent})
        assert accepted.status_code == 202, accepted.text
        record = wait_ready(client, accepted.json()["task_id"])
        assert record["status"] == "ready", f"task {task} ({len(labels)} classes) failed: {record.get('error')}"
        assert record["index"] == task and record["model_version"] == task + 1
        learned += labels
        wait_for(lambda version=task + 1: client.get("/model").json()["model_version"] == version)
        # A prediction through the server between tasks, over every class learned so far.
        response = client.post("/predict?top_k=1", files=[("images", ("x.png", png((30, 200, 30)), "image/png"))])
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["top"][0]["label"] in learned
    assert client.get("/model").json()["num_classes"] == len(learned) == sum(class_count(t) for t in range(TASKS))


def test_routers_loaded_under_inference_mode_are_usable_by_autograd(client: TestClient, worker: TrainingWorker) -> None:
    files, sent = task_files(["a", "b"])
    record = wait_ready(client, client.post("/tasks", files=files, data={"labels": sent}).json()["task_id"])
    assert record["status"] == "ready"
    manifest = worker.registry.latest_manifest()
    assert manifest is not None
    routers = CachedRouters(worker.registry, manifest, worker.store.site_dims, worker.cache)
    worker.cache.clear()
    with torch.inference_mode(), routers.hold(0) as held:
        first_weight = held[0][0]
    assert not first_weight.is_inference()
    with routers.hold(0) as held:  # now a cache hit, read outside inference mode as a trainer would
        weight = held[0][0]
        assert weight is first_weight
        x = torch.ones(1, weight.shape[1], requires_grad=True)
        torch.nn.functional.linear(x, weight).sum().backward()
    assert x.grad is not None
