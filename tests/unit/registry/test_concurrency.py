"""Concurrent publishers in separate processes end with one consistent, linear history."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from registry import LockTimeout, PublishConflict, Registry

from .helpers import publish_task

_TASKS_PER_PROCESS = 4
_MAX_ATTEMPTS = 200


def _publisher(root: str, name: str, start: threading.Barrier) -> None:
    reg = Registry.from_path(root, lock_timeout_s=30.0)
    start.wait(timeout=30)
    for i in range(_TASKS_PER_PROCESS):
        for _ in range(_MAX_ATTEMPTS):
            try:
                publish_task(reg, reg.latest_manifest(), f"{name}{i}", seed=i)
                break
            except PublishConflict:
                pass  # another process published first: rebuild on the new latest version
        else:
            raise RuntimeError(f"{name}{i} was never published")


def test_two_processes_publishing_concurrently_build_a_linear_history(root: Path) -> None:
    # fork: the children need nothing but this module, and starting them stays cheap on a busy machine.
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_publisher, args=(str(root), name, start)) for name in ("a", "b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        assert proc.exitcode == 0

    reg = Registry.from_path(root)
    total = 2 * _TASKS_PER_PROCESS
    assert reg.current_version() == total
    assert reg.list_versions() == list(range(1, total + 1))
    previous = None
    for version in range(1, total + 1):
        manifest = reg.load_manifest(version)
        assert manifest.parent == (None if version == 1 else version - 1)
        if previous is not None:
            assert manifest.tasks[:-1] == previous.tasks  # each version adds exactly one task to its parent's
        reg.verify(manifest)
        previous = manifest
    assert previous is not None
    task_ids = [task.task_id for task in previous.tasks]
    assert sorted(task_ids) == sorted(f"{n}{i}" for n in "ab" for i in range(_TASKS_PER_PROCESS))
    for name in "ab":  # each process published its own tasks in order
        assert [t for t in task_ids if t.startswith(name)] == [f"{name}{i}" for i in range(_TASKS_PER_PROCESS)]


def test_publish_waits_for_the_lock_and_gives_up_after_its_timeout(root: Path) -> None:
    holder = Registry.from_path(root)
    publisher = Registry.from_path(root, lock_timeout_s=0.05)
    with holder.backend.lock(timeout_s=1.0), pytest.raises(LockTimeout, match=r"\.lock within 0\.05s"):
        publish_task(publisher, None, "t1")
    assert publisher.current_version() is None
    assert publish_task(publisher, None, "t1").version == 1  # released with the holder's block
