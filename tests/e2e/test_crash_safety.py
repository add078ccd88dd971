"""Crash safety with real processes: kill -9 while a task trains, restart, and the task is learned exactly once.

* kill -9 of the worker: `care-serve serve` restarts it; the task is trained again and becomes ready;
* kill -9 of the whole server (its process group, worker included) and a restart: the same;
* kill -9 of the server alone: its worker does not outlive it (it re-queues the task and exits);
* a task that fails (its stored upload is corrupted) leaves the model unchanged and the next task proceeds.
After each, the registry holds exactly the versions of the ready tasks and every one of them verifies: no partial
version is ever visible.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.datasets import Task, make_stream, png_bytes
from bench.harness import (
    CARE_SERVE,
    Process,
    alive,
    base_env,
    children,
    free_port,
    start,
    start_server,
    wait_task,
    wait_until,
)
from registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

# Enough epochs that training is still running when we strike; small images so that it stays quick.
CONFIG = {
    "backbone": "efficientnet_lite0",
    "image_size": "64",
    "train_epochs": "24",
    "align_epochs": "1",
    "poll_interval_s": "0.3",
    "serve_threads": "1",
    "train_threads": "1",
    "worker_poll_s": "0.2",
    "provisional": "false",  # one version per trained task; tests/e2e/test_provisional.py covers provisional ones
    "device": "cpu",
}


def retrain_env(tmp_path: Path) -> dict[str, str]:
    """A restarted server's settings: the interrupted task is trained again from scratch, and how long it trains
    is not what these tests check (24 epochs again cost the CI run about 15 s a test)."""
    return base_env(data_dir=str(tmp_path / "data"), **{**CONFIG, "train_epochs": "2"})


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return list(make_stream("digits5", seed=1, train_per_class=30, test_per_class=5).tasks)


def teach(url: str, task: Task) -> str:
    files = [("images", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(task.train.images)]
    response = httpx.post(f"{url}/tasks", files=files, data={"labels": task.train.labels}, timeout=60)
    assert response.status_code == 202, response.text
    return str(response.json()["task_id"])


def record(url: str, task_id: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/tasks/{task_id}", timeout=10).json()
    return body


def wait_training(url: str, task_id: str, logs: Any) -> None:
    """Until the task is in the middle of its first epochs."""

    def training() -> bool | None:
        body = record(url, task_id)
        assert body["status"] not in ("ready", "failed"), f"finished before we could strike: {body}"
        progress = body["progress"] or {}
        return True if body["status"] == "training" and (progress.get("step") or 0) >= 3 else None

    wait_until(f"task {task_id} to be training", training, 180, logs)


def wait_finished(url: str, task_id: str, logs: Any) -> dict[str, Any]:
    return wait_task(url, task_id, logs, 300)


def check_registry(data_dir: Path, ready_task_ids: list[str]) -> None:
    """Exactly one version per ready task, in order, and every version verifies (no partial version)."""
    registry = Registry.from_path(data_dir / "registry")
    versions = registry.list_versions()
    assert versions == list(range(1, len(ready_task_ids) + 1)), versions
    for version in versions:
        manifest = registry.load_manifest(version)
        registry.verify(manifest)
        assert [t.task_id for t in manifest.tasks] == ready_task_ids[:version]
    assert registry.current_version() == (versions[-1] if versions else None)


def worker_of(server: Process) -> int:
    pids = wait_until("the supervised worker", lambda: children(server.pid) or None, 60, server.tail)
    assert len(pids) == 1, pids
    return int(pids[0])


def test_kill_9_of_the_worker_while_training(tmp_path: Path, tasks: list[Task]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server("server", port, base_env(data_dir=str(tmp_path / "data"), **CONFIG), tmp_path)
    try:
        task_id = teach(url, tasks[0])
        wait_training(url, task_id, server.tail)
        victim = worker_of(server)
        os.kill(victim, signal.SIGKILL)
        result = wait_finished(url, task_id, server.tail)
        assert result["status"] == "ready" and result["index"] == 0 and result["model_version"] == 1, result
        assert worker_of(server) != victim  # the supervisor started a new one
        check_registry(tmp_path / "data", [task_id])
        # The next task proceeds normally.
        second = teach(url, tasks[1])
        assert wait_finished(url, second, server.tail)["model_version"] == 2
        check_registry(tmp_path / "data", [task_id, second])
    finally:
        server.stop()


def test_kill_9_of_the_whole_server_then_restart(tmp_path: Path, tasks: list[Task]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env(data_dir=str(tmp_path / "data"), **CONFIG)
    server = start_server("server", port, env, tmp_path)
    try:
        task_id = teach(url, tasks[0])
        wait_training(url, task_id, server.tail)
        worker = worker_of(server)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its worker die at once, mid-training
        server.popen.wait(30)
        wait_until("the worker to be gone", lambda: not alive(worker) or None, 30, server.tail)
        check_registry(tmp_path / "data", [])

        restarted = start_server("restarted", port, retrain_env(tmp_path), tmp_path)
        try:
            result = wait_finished(url, task_id, restarted.tail)
            assert result["status"] == "ready" and result["model_version"] == 1, result
            check_registry(tmp_path / "data", [task_id])
        finally:
            restarted.stop()
    finally:
        server.stop()


def test_kill_9_of_the_server_alone_does_not_orphan_its_worker(tmp_path: Path, tasks: list[Task]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env(data_dir=str(tmp_path / "data"), **CONFIG)
    server = start_server("server", port, env, tmp_path)
    try:
        task_id = teach(url, tasks[0])
        wait_training(url, task_id, server.tail)
        worker = worker_of(server)
        os.kill(server.pid, signal.SIGKILL)
        server.popen.wait(30)
        wait_until("the orphaned worker to stop", lambda: not alive(worker) or None, 60, server.tail)

        restarted = start_server("restarted", port, retrain_env(tmp_path), tmp_path)
        try:
            assert wait_finished(url, task_id, restarted.tail)["status"] == "ready"
            check_registry(tmp_path / "data", [task_id])
        finally:
            restarted.stop()
    finally:
        server.stop()


def test_a_failed_task_leaves_the_model_unchanged_and_the_next_proceeds(tmp_path: Path, tasks: list[Task]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env(data_dir=str(tmp_path / "data"), **{**CONFIG, "train_epochs": "2"})
    server = start_server("server", port, env, tmp_path, "--no-worker")
    worker: Process | None = None
    try:
        doomed, healthy = teach(url, tasks[0]), teach(url, tasks[1])
        stored = tmp_path / "data" / "uploads" / doomed / "images"
        first_image = sorted(stored.iterdir())[0]
        first_image.write_bytes(b"corrupted on disk")
        worker = start("worker", [CARE_SERVE, "worker"], env, tmp_path)
        failed = wait_finished(url, doomed, worker.tail)
        assert failed["status"] == "failed" and failed["model_version"] is None
        assert first_image.name in failed["error"], failed["error"]
        ready = wait_finished(url, healthy, worker.tail)
        assert ready["status"] == "ready" and ready["index"] == 0 and ready["model_version"] == 1
        check_registry(tmp_path / "data", [healthy])
        served = wait_until(
            "version 1 served", lambda: httpx.get(f"{url}/model").json()["model_version"] or None, 30, server.tail
        )
        assert served == 1
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
