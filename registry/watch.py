"""Hot-loading across processes: poll a registry's current version and report changes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

__all__ = ["VersionSource", "VersionWatcher"]

logger = logging.getLogger(__name__)


class VersionSource(Protocol):
    """Anything with a cheap ``current_version()``, such as :class:`registry.Registry`."""

    def current_version(self) -> int | None:
        """Return the current version, or None when nothing is published."""
        ...


class VersionWatcher:
    """A daemon thread that polls ``registry.current_version()`` and calls ``on_version`` when it changes.

    The version seen at the first poll is the baseline and is not reported unless ``notify_initial`` is True. A
    change is reported once; if ``on_version`` raises, the error is logged and the same version is offered again at
    the next poll (so a transient load failure is retried), and the thread keeps running. Errors reading the
    version are logged and the poll is skipped. Callbacks are never run concurrently.

    Args:
        registry: What to poll.
        interval_s: Seconds between polls.
        on_version: Called with the new version number.
        notify_initial: Also report the version found at the first poll.
    """

    def __init__(
        self,
        registry: VersionSource,
        interval_s: float,
        on_version: Callable[[int], None],
        *,
        notify_initial: bool = False,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}")
        self._source = registry
        self._interval_s = interval_s
        self._on_version = on_version
        self._notify_initial = notify_initial
        self._poll_lock = threading.Lock()
        self._primed = False
        self._seen: int | None = None
        self._failing: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def last_version(self) -> int | None:
        """The last version reported (or the baseline); None before the first successful poll."""
        return self._seen

    @property
    def running(self) -> bool:
        """Whether the polling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def poll_once(self) -> int | None:
        """Poll now, in the calling thread.

        Returns:
            The version passed to ``on_version`` by this poll, or None when nothing was reported (no change, the
            baseline poll, or a failure, which is logged).
        """
        with self._poll_lock:
            try:
                version = self._source.current_version()
            except Exception:
                logger.exception("reading the current registry version failed; will retry in %.1fs", self._interval_s)
                return None
            if not self._primed:
                self._primed = True
                if not self._notify_initial:
                    self._seen = version
                    return None
            if version is None or version == self._seen:
                return None
            try:
                self._on_version(version)
            except Exception:
                if self._failing != version:
                    logger.exception("loading registry version %d failed; will retry at the next poll", version)
                else:
                    logger.warning("loading registry version %d failed again; will retry", version)
                self._failing = version
                return None
            self._failing = None
            self._seen = version
            logger.info("registry version %d picked up", version)
            return version

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.poll_once()

    def start(self) -> None:
        """Take the baseline (a synchronous first poll) and start the polling thread. Idempotent while running.

        With ``notify_initial`` the first ``on_version`` call therefore happens in the caller's thread, before
        ``start`` returns.

        Raises:
            RuntimeError: A previous stop() timed out and its thread is still inside a callback.
        """
        if self.running:
            if self._stop.is_set():
                raise RuntimeError("the watcher is still stopping (a callback is running); call stop() again first")
            return
        self._stop.clear()
        self.poll_once()
        self._thread = threading.Thread(target=self._run, name="care-registry-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling and join the thread for at most ``timeout_s`` seconds (a running callback is not cut)."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("the registry watcher did not stop within %.1fs (a callback is still running)", timeout_s)
        else:
            self._thread = None
