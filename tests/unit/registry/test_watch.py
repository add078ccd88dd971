"""The version watcher: deterministic polls, and a thread that notices another instance's publish."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from registry import Registry, VersionWatcher

from .helpers import publish_task


class _FakeSource:
    def __init__(self, version: int | None) -> None:
        self.version = version
        self.error: Exception | None = None

    def current_version(self) -> int | None:
        if self.error is not None:
            raise self.error
        return self.version


def test_poll_once_reports_changes_but_not_the_starting_version() -> None:
    source = _FakeSource(3)
    seen: list[int] = []
    watcher = VersionWatcher(source, interval_s=60, on_version=seen.append)
    assert watcher.poll_once() is None  # baseline
    assert watcher.last_version == 3
    assert watcher.poll_once() is None
    source.version = 4
    assert watcher.poll_once() == 4
    assert watcher.poll_once() is None
    assert seen == [4]


def test_notify_initial_reports_the_starting_version() -> None:
    seen: list[int] = []
    watcher = VersionWatcher(_FakeSource(3), interval_s=60, on_version=seen.append, notify_initial=True)
    assert watcher.poll_once() == 3
    assert watcher.poll_once() is None
    assert seen == [3]


def test_empty_registry_then_first_publish() -> None:
    source = _FakeSource(None)
    seen: list[int] = []
    watcher = VersionWatcher(source, interval_s=60, on_version=seen.append, notify_initial=True)
    assert watcher.poll_once() is None
    source.version = 1
    assert watcher.poll_once() == 1
    assert seen == [1]


def test_failing_callback_is_logged_survived_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    source = _FakeSource(1)
    calls: list[int] = []

    def flaky(version: int) -> None:
        calls.append(version)
        if len(calls) == 1:
            raise RuntimeError("load failed")

    watcher = VersionWatcher(source, interval_s=60, on_version=flaky)
    watcher.poll_once()
    source.version = 2
    with caplog.at_level(logging.ERROR, logger="registry.watch"):
        assert watcher.poll_once() is None
    assert "loading registry version 2 failed" in caplog.text and "load failed" in caplog.text
    assert watcher.last_version == 1
    assert watcher.poll_once() == 2  # retried at the next poll
    assert calls == [2, 2]


def test_errors_reading_the_version_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    source = _FakeSource(1)
    watcher = VersionWatcher(source, interval_s=60, on_version=lambda _: None)
    source.error = OSError("nfs hiccup")
    with caplog.at_level(logging.ERROR, logger="registry.watch"):
        assert watcher.poll_once() is None
    assert "nfs hiccup" in caplog.text
    source.error = None
    assert watcher.poll_once() is None and watcher.last_version == 1


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        VersionWatcher(_FakeSource(None), interval_s=0, on_version=lambda _: None)


def test_thread_notices_a_publish_from_another_instance(root: Path) -> None:
    writer = Registry.from_path(root)
    v1 = publish_task(writer, None, "t1")
    seen: list[int] = []
    got = threading.Event()

    def on_version(version: int) -> None:
        seen.append(version)
        got.set()

    watcher = VersionWatcher(Registry.from_path(root), interval_s=0.01, on_version=on_version)
    watcher.start()
    try:
        assert watcher.running and watcher.last_version == 1
        publish_task(writer, v1, "t2", seed=1)
        assert got.wait(timeout=10), "the watcher did not notice version 2"
    finally:
        watcher.stop(timeout_s=5)
    assert seen == [2]
    assert not watcher.running


def test_stop_is_bounded_while_a_callback_runs() -> None:
    source = _FakeSource(1)
    entered, release = threading.Event(), threading.Event()

    def slow(version: int) -> None:
        entered.set()
        release.wait(timeout=10)

    watcher = VersionWatcher(source, interval_s=0.01, on_version=slow)
    watcher.start()
    source.version = 2
    assert entered.wait(timeout=10)
    watcher.stop(timeout_s=0.05)
    assert watcher.running  # still inside the callback; stop() returned anyway
    with pytest.raises(RuntimeError, match="still stopping"):
        watcher.start()
    release.set()
    watcher.stop(timeout_s=10)
    assert not watcher.running
