"""The HTTP API against the real app (lifespan, job store, registry, worker code) through httpx."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from service.training.worker import TrainingWorker
from tests.integration.conftest import png, task_files, updated, wait_for, wait_ready

API_SERIES = {
    "care_router_cache_capacity_bytes",
    "care_router_cache_resident_bytes",
    "care_router_cache_resident_routers",
    "care_router_cache_lookups",
    "care_router_cache_evictions",
    "care_router_load_seconds",
    "care_model_version",
    "care_tasks_learned",
    "care_classes_learned",
    "care_tasks",
    "care_training_seconds",
    "care_predict_requests",
    "care_predict_latency_seconds",
    "care_batch_size",
    "care_batch_inference_seconds",
}


def test_fresh_server_is_ready_and_says_nothing_is_learned(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"
    model = client.get("/model").json()
    assert model["model_version"] is None and model["num_classes"] == 0 and model["backbone"] == "test_vit"
    response = client.post("/predict", content=png((1, 2, 3)), headers={"content-type": "image/png"})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["error"]["code"] == "no_classes"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/tasks", "/tasks/{task_id}", "/model", "/metrics", "/readyz"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_learn_two_tasks_then_predict_them(client: TestClient, worker: TrainingWorker) -> None:
    files, labels = task_files(["red", "green"])
    accepted = client.post("/tasks", files=files, data={"labels": labels, "name": "first"})
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert accepted.headers["location"] == f"/tasks/{body['task_id']}"
    assert body["classes"] == ["red", "green"] and body["num_images"] == 6 and body["status"] == "queued"
    assert wait_ready(client, body["task_id"])["status"] == "ready"

    files, labels = task_files(["blue", "yellow"])
    import json

    second = client.post("/tasks", files=files, data={"labels": json.dumps(labels)}).json()
    record = wait_ready(client, second["task_id"])
    assert record["status"] == "ready" and record["index"] == 1 and record["model_version"] == 2
    assert record["metrics"]["train_accuracy"] >= 0.0 and record["started_at"] and record["finished_at"]
    wait_for(lambda: client.get("/model").json()["model_version"] == 2)

    listed = client.get("/tasks").json()
    assert [t["task_id"] for t in listed] == [body["task_id"], second["task_id"]]
    response = client.post(
        "/predict?top_k=4",
        files=[
            ("images", ("a.png", png((30, 30, 200)), "image/png")),
            ("images", ("b.png", png((9, 9, 9)), "image/png")),
        ],
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model_version"] == 2 and len(result["predictions"]) == 2
    for prediction in result["predictions"]:
        assert {p["label"] for p in prediction["top"]} == {"red", "green", "blue", "yellow"}
        scores = [p["score"] for p in prediction["top"]]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-4)
        assert {p["task_id"] for p in prediction["top"]} == {body["task_id"], second["task_id"]}


def test_metrics_expose_the_documented_series_without_task_labels(client: TestClient, worker: TrainingWorker) -> None:
    files, labels = task_files(["a1", "a2"])
    task_id = client.post("/tasks", files=files, data={"labels": labels}).json()["task_id"]
    wait_ready(client, task_id)
    wait_for(lambda: client.get("/model").json()["model_version"] == 1)
    client.post("/predict", content=png((1, 2, 3)), headers={"content-type": "image/png"})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert set(families) >= API_SERIES, API_SERIES - set(families)
    assert families["care_model_version"].samples[0].value == 1
    tasks = {s.labels["status"]: s.value for s in families["care_tasks"].samples}
    assert tasks == {"queued": 0, "training": 0, "ready": 1, "failed": 0}
    lookups = {
        s.labels["result"]: s.value for s in families["care_router_cache_lookups"].samples if s.name.endswith("_total")
    }
    assert lookups["hit"] + lookups["miss"] > 0
    for family in families.values():
        for sample in family.samples:
            assert not {"task_id", "label", "class"} & set(sample.labels), sample


def test_idempotency_key_returns_the_same_task(client: TestClient) -> None:
    files, labels = task_files(["x1", "x2"])
    first = client.post("/tasks", files=files, data={"labels": labels}, headers={"Idempotency-Key": "abc"})
    again = client.post("/tasks", files=files, data={"labels": labels}, headers={"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 202
    assert first.json()["task_id"] == again.json()["task_id"]
    assert len(client.get("/tasks").json()) == 1
    duplicate = client.post("/tasks", files=files, data={"labels": labels})
    assert duplicate.status_code == 409 and duplicate.json()["error"]["details"]["labels"] == ["x1", "x2"]


def test_a_reused_idempotency_key_with_another_request_is_422(client: TestClient) -> None:
    files, labels = task_files(["k1", "k2"])
    key = {"Idempotency-Key": "reused"}
    first = client.post("/tasks", files=files, data={"labels": labels}, headers=key)
    assert first.status_code == 202, first.text
    # A retry is the same request even with other file names (and a fresh multipart boundary).
    renamed = [(field, (f"copy-{name}", data, kind)) for field, (name, data, kind) in files]
    retry = client.post("/tasks", files=renamed, data={"labels": labels}, headers=key)
    assert retry.status_code == 202 and retry.json()["task_id"] == first.json()["task_id"]
    other_files, other_labels = task_files(["k3", "k4"])
    for request in (
        {"files": other_files, "data": {"labels": other_labels}},  # other images and labels
        {"files": files, "data": {"labels": labels, "name": "renamed"}},  # same images, another name
        {"files": files, "data": {"labels": list(reversed(labels))}},  # same images, labels swapped
    ):
        response = client.post("/tasks", **request, headers=key)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "idempotency_key_reused" and error["details"] == {"task_id": first.json()["task_id"]}
    assert len(client.get("/tasks").json()) == 1


def test_served_here_says_whether_the_answering_server_loaded_the_task(
    settings: Settings, client: TestClient, client_factory: Callable[..., TestClient], worker: TrainingWorker
) -> None:
    stale = client_factory(updated(settings, poll_interval_s=3600))  # started now, it never loads a newer version
    files, labels = task_files(["s1", "s2"])
    task_id = client.post("/tasks", files=files, data={"labels": labels}).json()["task_id"]
    assert client.get(f"/tasks/{task_id}").json()["served_here"] is False  # queued
    assert wait_ready(client, task_id)["status"] == "ready"
    wait_for(lambda: client.get(f"/tasks/{task_id}").json()["served_here"])
    assert [t["served_here"] for t in client.get("/tasks").json()] == [True]
    record = stale.get(f"/tasks/{task_id}").json()
    assert (record["status"], record["model_version"], record["served_here"]) == ("ready", 1, False)
    assert stale.get("/model").json()["model_version"] is None


def test_queue_full_answers_429_with_retry_after(settings: Settings, client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(updated(settings, max_queued_tasks=1))
    files, labels = task_files(["q1", "q2"])
    assert client.post("/tasks", files=files, data={"labels": labels}).status_code == 202
    files, labels = task_files(["q3", "q4"])
    response = client.post("/tasks", files=files, data={"labels": labels})
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "queue_full"


def test_failed_task_leaves_the_model_unchanged_and_the_next_one_proceeds(
    client: TestClient, worker: TrainingWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.training.worker as worker_module

    real_learn = worker_module.learn_task

    def failing_for_doomed(*args: object, **kwargs: object) -> object:
        if kwargs.get("progress") is not None and len(args) >= 7 and args[6] == 2 and _doomed[0]:
            _doomed[0] = False
            raise RuntimeError("simulated training failure")
        return real_learn(*args, **kwargs)  # type: ignore[arg-type]

    _doomed = [True]
    monkeypatch.setattr(worker_module, "learn_task", failing_for_doomed)
    files, labels = task_files(["f1", "f2"])
    doomed = client.post("/tasks", files=files, data={"labels": labels}).json()["task_id"]
    files, labels = task_files(["g1", "g2", "g3"])
    healthy = client.post("/tasks", files=files, data={"labels": labels}).json()["task_id"]
    failed = wait_ready(client, doomed)
    assert failed["status"] == "failed" and "simulated training failure" in failed["error"]
    ready = wait_ready(client, healthy)
    assert ready["status"] == "ready" and ready["index"] == 0 and ready["model_version"] == 1
    # The failed task's labels are free again.
    files, labels = task_files(["f1", "f2"])
    assert client.post("/tasks", files=files, data={"labels": labels}).status_code == 202


def test_auth_guards_tasks_and_predict(settings: Settings, client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(updated(settings, admin_token="s3cret", api_key="k3y"))
    files, labels = task_files(["p1", "p2"])
    assert client.post("/tasks", files=files, data={"labels": labels}).status_code == 401
    wrong = client.post("/tasks", files=files, data={"labels": labels}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    assert client.get("/tasks").status_code == 401
    ok = client.post("/tasks", files=files, data={"labels": labels}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 202
    image = {"content": png((1, 2, 3)), "headers": {"content-type": "image/png"}}
    assert client.post("/predict", **image).status_code == 401  # type: ignore[arg-type]
    forbidden = client.post(
        "/predict", content=image["content"], headers={"content-type": "image/png", "X-API-Key": "x"}
    )
    assert forbidden.status_code == 403
    allowed = client.post(
        "/predict", content=image["content"], headers={"content-type": "image/png", "X-API-Key": "k3y"}
    )
    assert allowed.status_code == 503  # authorised; nothing learned yet
    assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
