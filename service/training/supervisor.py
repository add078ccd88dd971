"""Starts the training worker as a child process of `care-serve serve` and restarts it if it dies."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading

from service.settings import Settings

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
STOP_TIMEOUT_S = 15.0
PR_SET_PDEATHSIG = 1
# Loaded in the parent: a forked child of a threaded process must not dlopen (it could deadlock on the loader lock).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _stop_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the server dies, even by SIGKILL.

    Without this a killed server leaves an orphaned worker that keeps the lineage lease. SIGTERM (not SIGKILL)
    lets the worker put the task it was training back in the queue.
    """
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class WorkerSupervisor:
    """Runs `care-serve worker` with the server's settings (passed as CARE_ variables) and keeps it running."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="care-worker-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.settings.environment()}
        command = [sys.executable, "-m", "service.cli", "--log-level", self.settings.log_level, "worker"]
        process = subprocess.Popen(command, env=env, preexec_fn=_stop_with_parent)
        logger.info("started training worker (pid %d)", process.pid)
        return process

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            self._process = self._spawn()
            code = self._process.wait()
            if self._stopping.is_set():
                return
            self.restarts += 1
            logger.error("training worker exited with %s; restarting in %.0f s", code, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def stop(self) -> None:
        """Ask the worker to stop (SIGTERM: it re-queues the task it was training), then make sure it did."""
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("training worker did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
