"""Every documented or plotted series is exposed, and the ones that real traffic should move do move.

The series come from the documentation (README.md and docs/*.md, every backticked `care_…` name) and from the
Grafana dashboard's queries, not from a list kept here: a series documented or plotted but never registered, or
registered but never set (as `care_predict_queue_images` once was), fails. Values are read from real scrapes of
/metrics, parsed with prometheus_client's parser, before and after traffic: two tasks taught through POST /tasks
and trained by the worker, and /predict requests, some of them held behind a running batch so that the queue fills.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import service.inference.snapshot as snapshot
from service.settings import Settings
from service.training.worker import TrainingWorker
from tests.integration.conftest import png, task_files, updated, wait_for, wait_ready

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")

# Documented series that this traffic leaves where they were: static, or moved only by failures and provisional
# classes (tests/integration/test_provisional.py and test_registry_serving.py cover those). Every other documented
# or plotted series must change between the scrape before the traffic and the one after it.
STILL = {
    "care_router_cache_capacity_bytes",  # configuration
    "care_router_cache_evictions",  # the default cap holds every router of two tiny tasks
    "care_classes_provisional",  # provisional versions are off in these settings
    "care_version_load_failures",  # no version is refused
}

Scrape = dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]


def family_name(series: str) -> str:
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def documented_series() -> set[str]:
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    names: set[str] = set()
    for path in texts:
        for quoted in re.findall(r"`([^`]*)`", path.read_text()):
            names.update(family_name(name) for name in re.findall(r"\b(care_[a-z_]*[a-z])\b", quoted))
    return names


def plotted_series() -> set[str]:
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    names.update(family_name(name) for name in re.findall(r"\b(care_[a-z_]*[a-z])\b", value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    dashboards = sorted((ROOT / "docker" / "grafana" / "dashboards").glob("*.json"))
    assert dashboards, "no Grafana dashboard found"
    for path in dashboards:
        walk(json.loads(path.read_text()))
    return names


def scrape(client: TestClient) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200
    families: Scrape = {}
    for family in text_string_to_metric_families(response.text):
        samples = families.setdefault(family.name, {})
        for sample in family.samples:
            if not sample.name.endswith("_created"):  # a creation time moves by itself
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families


def queued(client: TestClient) -> float:
    return scrape(client)["care_predict_queue_images"][("care_predict_queue_images", ())]


def test_the_sources_name_the_series_this_test_knows() -> None:
    documented, plotted = documented_series(), plotted_series()
    # The parsing above found something real (a regex that matched nothing would make the test below vacuous).
    assert {"care_predict_queue_images", "care_router_cache_lookups", "care_batch_size"} <= documented & plotted
    assert plotted <= documented, f"plotted but not documented: {sorted(plotted - documented)}"
    assert documented >= STILL, f"STILL names series the docs no longer document: {sorted(STILL - documented)}"


def test_every_documented_and_plotted_series_is_exposed_and_moves_under_traffic(
    settings: Settings,
    client_factory: Callable[[Settings], TestClient],
    worker: TrainingWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Batches of at most 2 images, so that requests held behind a running batch wait in the queue; a sweep (and
    # with it a measurement of the data directory) every 0.2 s.
    client = client_factory(updated(settings, max_batch_size=2, max_batch_wait_ms=0, sweep_interval_s=0.2))
    expected = documented_series() | plotted_series()
    before = scrape(client)

    for labels in (["m1", "m2"], ["m3", "m4"]):  # the second task's version is the one care_task_servable counts
        files, sent = task_files(labels)
        accepted = client.post("/tasks", files=files, data={"labels": sent})
        assert accepted.status_code == 202, accepted.text
        assert wait_ready(client, accepted.json()["task_id"])["status"] == "ready"
    wait_for(lambda: client.get("/model").json()["model_version"] == 2)

    # Hold the first batch on the inference thread; the requests sent meanwhile wait in the batcher's queue.
    entered, gate = threading.Event(), threading.Event()
    real_probabilities = snapshot.ServedVersion.probabilities

    def held(self: snapshot.ServedVersion, images: object) -> object:
        entered.set()
        assert gate.wait(60), "the test never released the batch"
        return real_probabilities(self, images)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot.ServedVersion, "probabilities", held)
    image = {"content": png((200, 30, 30)), "headers": {"content-type": "image/png"}}
    codes: list[int] = []

    def predict() -> None:
        codes.append(client.post("/predict", **image).status_code)  # type: ignore[arg-type]

    first = threading.Thread(target=predict)
    first.start()
    assert entered.wait(60), "the first /predict never reached the model"
    others = [threading.Thread(target=predict) for _ in range(3)]
    for thread in others:
        thread.start()
    try:
        assert wait_for(lambda: queued(client) == 3, timeout_s=30)  # three images wait behind the held batch
        during = scrape(client)
    finally:
        gate.set()
    for thread in (first, *others):
        thread.join(timeout=60)
    assert codes == [200] * 4
    assert queued(client) == 0  # every waiting image was taken into a batch

    # The data directory is measured by the periodic sweep, not on every scrape: wait for one after the traffic.
    wait_for(lambda: scrape(client).get("care_data_dir_bytes") != before.get("care_data_dir_bytes"), timeout_s=30)
    after = scrape(client)
    missing = expected - set(after)
    assert not missing, f"documented or plotted but not exposed: {sorted(missing)}"
    # A gauge that went up and back down (the queue) moved too: compare the scrape taken while requests waited.
    still = {name for name in expected if after[name] == before.get(name) == during.get(name)}
    assert still == STILL, (
        f"should have moved under traffic: {sorted(still - STILL)}; moved although listed as still: "
        f"{sorted(STILL - still)}"
    )
    # The moves are the right ones, not just any change.
    values = {name: dict(samples) for name, samples in after.items()}
    assert values["care_model_version"][("care_model_version", ())] == 2
    assert values["care_tasks_learned"][("care_tasks_learned", ())] == 2
    assert values["care_classes_learned"][("care_classes_learned", ())] == 4
    assert values["care_tasks"][("care_tasks", (("status", "ready"),))] == 2
    assert values["care_training_seconds"][("care_training_seconds_count", ())] == 2
    assert values["care_task_servable_seconds"][("care_task_servable_seconds_count", ())] == 1
    assert values["care_predict_requests"][("care_predict_requests_total", (("code", "200"),))] == 4
    assert values["care_batch_size"][("care_batch_size_sum", ())] == 4
    batches = values["care_batch_size"][("care_batch_size_count", ())]
    assert values["care_batch_inference_seconds"][("care_batch_inference_seconds_count", ())] == batches
    assert values["care_batch_inference_seconds"][("care_batch_inference_seconds_sum", ())] > 0
