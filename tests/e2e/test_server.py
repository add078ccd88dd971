"""A real `care-serve serve` (uvicorn, its supervised worker) on a loopback port, used over HTTP as a client would.

It learns two tasks of real images (scikit-learn's digits: one uploaded as multipart, one as a zip ImageFolder),
predicts the new classes back, is scraped like Prometheus would, and shuts down cleanly on SIGTERM.
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.datasets import Task, make_stream, png_bytes, write_imagefolder_zip
from bench.harness import alive, base_env, children, free_port, start_server, wait_task, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

ENV = {
    "backbone": "efficientnet_lite0",
    "image_size": "64",
    "train_epochs": "6",
    "align_epochs": "2",
    "poll_interval_s": "0.3",
    "serve_threads": "1",
    "train_threads": "1",
    "worker_poll_s": "0.2",
    "provisional": "false",  # version numbers below count trained tasks; see tests/e2e/test_provisional.py
    # CPU in CI; CARE_TEST_DEVICE=cuda runs the same learning and serving on a GPU (tools/device_checks.sh).
    "device": os.environ.get("CARE_TEST_DEVICE", "cpu"),
}


def teach_multipart(url: str, task: Task) -> str:
    files = [("images", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(task.train.images)]
    response = httpx.post(f"{url}/tasks", files=files, data={"labels": task.train.labels, "name": "m"}, timeout=60)
    assert response.status_code == 202, response.text
    return str(response.json()["task_id"])


def teach_zip(url: str, task: Task) -> str:
    archive = io.BytesIO()
    write_imagefolder_zip(task, archive)
    response = httpx.post(
        f"{url}/tasks", content=archive.getvalue(), headers={"content-type": "application/zip"}, timeout=60
    )
    assert response.status_code == 202, response.text
    assert sorted(response.json()["classes"]) == sorted(task.classes)
    return str(response.json()["task_id"])


def wait_ready(url: str, task_id: str, logs: Any) -> dict[str, Any]:
    record = wait_task(url, task_id, logs, 240)
    assert record["status"] == "ready", record
    return record


def test_learn_two_tasks_over_http_predict_scrape_and_stop(tmp_path: Path) -> None:
    port, url = free_port(), ""
    server = start_server("server", port, base_env(data_dir=str(tmp_path / "data"), **ENV), tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        stream = make_stream("digits5", seed=0, train_per_class=40, test_per_class=15)
        first, second = stream.tasks[:2]
        ids = [teach_multipart(url, first), teach_zip(url, second)]
        records = [wait_ready(url, task_id, server.tail) for task_id in ids]
        assert [r["index"] for r in records] == [0, 1] and [r["model_version"] for r in records] == [1, 2]
        wait_until(
            "version 2 served", lambda: httpx.get(f"{url}/model").json()["model_version"] == 2 or None, 30, server.tail
        )

        seen = stream.seen_test_data(1)
        images, labels = seen.images, seen.labels
        correct = 0
        for start in range(0, len(images), 16):
            files = [
                ("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images[start : start + 16])
            ]
            body = httpx.post(f"{url}/predict", files=files, params={"top_k": 2}, timeout=60).json()
            assert body["model_version"] == 2
            for prediction, truth in zip(body["predictions"], labels[start : start + 16], strict=True):
                top = prediction["top"][0]
                assert top["label"] in first.classes + second.classes
                assert top["task_id"] == ids[0 if top["label"] in first.classes else 1]
                correct += top["label"] == truth
        accuracy = correct / len(images)
        assert accuracy > 0.6, f"accuracy {accuracy:.2f} on 4 digit classes (chance 0.25)"

        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
        assert families["care_model_version"].samples[0].value == 2
        assert families["care_classes_learned"].samples[0].value == 4
        statuses = {s.labels["status"]: s.value for s in families["care_tasks"].samples}
        assert statuses["ready"] == 2
        trained = [s for s in families["care_training_seconds"].samples if s.name.endswith("_count")]
        assert trained[0].value == 2
        requests = {
            s.labels["code"]: s.value for s in families["care_predict_requests"].samples if s.name.endswith("_total")
        }
        assert requests["200"] >= len(images) / 16
    finally:
        worker_pids = children(server.pid)
        server.popen.send_signal(signal.SIGTERM)
        code = server.popen.wait(60)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says why it stopped.
    assert code in (0, -signal.SIGTERM), server.tail(40)
    assert "Application shutdown complete" in server.log.read_text(), server.tail(40)
    assert worker_pids and not any(alive(pid) for pid in worker_pids), "the supervised worker outlived the server"
