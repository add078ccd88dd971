"""Provisional classes with a real server: a posted class answers before training ends, and kill -9 during a
provisional publish (its files staged, the manifest not yet written) loses no task and leaves no partial version
visible."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from bench.datasets import Task, make_stream, png_bytes
from bench.harness import base_env, children, free_port, start_server, wait_until
from registry import Registry
from tests.e2e.test_crash_safety import record, teach, wait_finished

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = {
    "backbone": "efficientnet_lite0",
    "image_size": "64",
    "train_epochs": "24",  # training outlasts the provisional path by far
    "poll_interval_s": "0.3",
    "serve_threads": "1",
    "train_threads": "1",
    "worker_poll_s": "0.2",
    "device": "cpu",
}


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return list(make_stream("digits5", seed=1, train_per_class=30, test_per_class=5).tasks)


def top1(url: str, task: Task) -> list[dict[str, object]]:
    files = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(task.test.images)]
    body = httpx.post(f"{url}/predict?top_k=1", files=files, timeout=60).json()
    return [{**p["top"][0], "model_version": body["model_version"]} for p in body["predictions"]]


def check_versions(data_dir: Path, trained: list[str]) -> None:
    """Every version verifies; trained tasks only grow, in order; the latest trains exactly `trained`."""
    registry = Registry.from_path(data_dir / "registry")
    previous: list[str] = []
    for version in registry.list_versions():
        manifest = registry.load_manifest(version)
        registry.verify(manifest)
        ids = [t.task_id for t in manifest.tasks]
        assert ids[: len(previous)] == previous, (version, ids, previous)
        previous = ids
    assert previous == trained


def test_a_posted_class_answers_before_training_and_survives_kill_9(tmp_path: Path, tasks: list[Task]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env(data_dir=str(tmp_path / "data"), **{**CONFIG, "train_epochs": "2"})
    server = start_server("server", port, env, tmp_path)
    try:
        first = teach(url, tasks[0])
        assert wait_finished(url, first, server.tail)["status"] == "ready"
    finally:
        server.stop()
    # Long training from here on, so that provisional answers are visibly earlier.
    env = base_env(data_dir=str(tmp_path / "data"), **CONFIG)
    server = start_server("server2", port, env, tmp_path)
    try:
        second = teach(url, tasks[1])

        def provisional_answer() -> list[dict[str, object]] | None:
            answers = top1(url, tasks[1])
            hits = [a for a in answers if a["label"] in tasks[1].train.labels and a["provisional"] is True]
            return answers if hits else None

        answers = wait_until("a provisional answer", provisional_answer, 120, server.tail)
        body = record(url, second)
        assert body["status"] in ("queued", "training") and body["provisional"] is True, body
        correct = sum(a["label"] == y for a, y in zip(answers, tasks[1].test.labels, strict=True))
        assert correct >= len(answers) // 2, answers

        # kill -9 of the whole server (worker included) in the middle of the third task's provisional publish: as
        # soon as one of its files is staged in the registry, before the manifest and CURRENT move.
        third = teach(url, tasks[2])
        registry_dir = tmp_path / "data" / "registry"
        deadline = time.monotonic() + 120
        while not any(path.name.endswith(".tmp") for path in registry_dir.rglob(".*")):
            assert time.monotonic() < deadline, f"no provisional publish was staged\n{server.tail()}"
            assert record(url, third)["provisional"] is False, "the publish finished before we could strike"
            time.sleep(0.002)
        worker = children(server.pid)
        os.killpg(server.pid, signal.SIGKILL)
        server.popen.wait(30)
        for pid in worker:
            wait_until(
                "the worker to be gone",
                lambda pid=pid: None if os.path.exists(f"/proc/{pid}") else True,
                30,
                server.tail,
            )
        # No half-written version: the staged files are not a version, CURRENT still names a complete one.
        check_versions(tmp_path / "data", [first])
        current = Registry.from_path(registry_dir).current_version()
        assert current is not None and current >= 2
    finally:
        server.stop()

    # The restarted server trains briefly: this phase checks that both accepted tasks survive and finish, not how long
    # they train (24 epochs each here cost the CI run about a minute).
    env = base_env(data_dir=str(tmp_path / "data"), **{**CONFIG, "train_epochs": "2"})
    restarted = start_server("restarted", port, env, tmp_path)
    try:
        # Both accepted tasks survive: each is answerable (provisional or trained), then trained.
        for task_id, task in ((second, tasks[1]), (third, tasks[2])):
            wait_until(
                f"{task_id} answerable",
                lambda task=task: True if any(a["label"] in task.train.labels for a in top1(url, task)) else None,
                300,
                restarted.tail,
            )
        assert wait_finished(url, second, restarted.tail)["status"] == "ready"
        assert wait_finished(url, third, restarted.tail)["status"] == "ready"
        check_versions(tmp_path / "data", [first, second, third])
        latest = Registry.from_path(tmp_path / "data" / "registry").current_version()
        final = wait_until(
            "the last version served",
            lambda: body if (body := httpx.get(f"{url}/model", timeout=10).json())["model_version"] == latest else None,
            30,
            restarted.tail,
        )
        assert final["num_provisional_classes"] == 0 and final["num_tasks"] == 3, final
    finally:
        restarted.stop()
