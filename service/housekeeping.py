"""Keeping the data directory from growing forever: crash leftovers, uploads of learned tasks, and disk usage.

What a sweep removes (each safe while other processes keep serving, submitting and publishing):

- upload staging directories (``uploads/.staging-*``) and upload directories no task owns, left by a submit that
  died (``JobStore.sweep_staging``), once unchanged for ``CARE_SWEEP_GRACE_S``;
- registry temp files (``.<name>.<hex>.tmp``) left by a publisher that died, once unchanged for the same grace;
- the uploads of ready tasks, unless ``CARE_KEEP_UPLOADS=true`` (the worker already deletes each one when it marks
  the task ready; the sweep catches those a crash or an older release left behind).

The server sweeps at start-up and every ``CARE_SWEEP_INTERVAL_S``; a worker sweeps when it starts. The grace is
what keeps an in-flight upload or publish safe: both keep touching their files, and a live publisher renames its
temp files within its lock timeout (a minute), so anything unchanged for the grace (15 minutes) is a leftover.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from registry import LocalDirectoryBackend
from service.jobs import JobStore
from service.jobs.store import open_upload_store
from service.jobs.uploads import STAGING_PREFIX
from service.settings import Settings

logger = logging.getLogger(__name__)

USAGE_KINDS = ("registry", "uploads", "staging", "jobs_db")
USAGE_MAX_AGE_S = 10.0  # a scrape re-measures at most this often: an uploads directory can hold many files


@dataclass(frozen=True)
class SweepResult:
    """What one sweep removed."""

    staging_dirs: int
    registry_temp_files: int
    ready_uploads: int


def _tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed; files vanishing meanwhile skipped)."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def data_dir_usage(settings: Settings) -> dict[str, int]:
    """Bytes on disk under the data directory by kind.

    ``registry``: published registry files; ``uploads``: stored task uploads; ``staging``: upload staging
    directories and registry temp files (in flight or crash leftovers); ``jobs_db``: the SQLite job database with its
    WAL (0 when the job store is on PostgreSQL, ``CARE_JOBS_URL``).
    """
    usage = dict.fromkeys(USAGE_KINDS, 0)
    registry = LocalDirectoryBackend(settings.registry_dir) if settings.registry_dir.is_dir() else None
    temp_bytes = 0
    if registry is not None:
        for path, _ in registry.temp_files():
            with contextlib.suppress(FileNotFoundError):
                temp_bytes += path.lstat().st_size
        usage["registry"] = max(0, _tree_bytes(settings.registry_dir) - temp_bytes)
    staging = temp_bytes
    uploads = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(settings.uploads_dir):
            size = _tree_bytes(Path(entry.path)) if entry.is_dir(follow_symlinks=False) else 0
            if entry.name.startswith(STAGING_PREFIX):
                staging += size
            else:
                uploads += size
    usage["uploads"], usage["staging"] = uploads, staging
    db = settings.jobs_db
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            usage["jobs_db"] += path.stat().st_size
    return usage


def sweep(settings: Settings, jobs: JobStore) -> SweepResult:
    """One pass over the data directory (see the module docstring); errors of one part do not stop the others."""
    staging = temps = ready = 0
    try:
        staging = jobs.sweep_staging(settings.sweep_grace_s)
    except Exception:
        logger.exception("sweeping upload staging directories failed; the next sweep retries")
    try:
        if settings.registry_dir.is_dir():
            temps = len(LocalDirectoryBackend(settings.registry_dir).sweep_temp_files(settings.sweep_grace_s))
    except Exception:
        logger.exception("sweeping registry temp files failed; the next sweep retries")
    if not settings.keep_uploads:
        try:
            ready = jobs.delete_ready_uploads()
        except Exception:
            logger.exception("deleting the uploads of ready tasks failed; the next sweep retries")
    return SweepResult(staging, temps, ready)


def open_job_store(settings: Settings) -> JobStore:
    """The job store of a worker: it deletes uploads of tasks it marks ready (unless kept), after a start-up sweep."""
    jobs = JobStore(
        settings.jobs_database,
        settings.uploads_dir,
        keep_uploads=settings.keep_uploads,
        shared_uploads=open_upload_store(settings.registry_url, settings.registry_endpoint_url),
    )
    result = sweep(settings, jobs)
    logger.info("start-up sweep: %s", result)
    return jobs


class Housekeeper:
    """The server's housekeeping: a sweep at start-up, then one every ``sweep_interval_s`` on a daemon thread.

    It also measures the data directory's usage for ``care_data_dir_bytes`` (after each sweep, and on a scrape
    when the last measurement is older than ``usage_max_age_s``).
    """

    def __init__(self, settings: Settings, jobs: JobStore, *, usage_max_age_s: float = USAGE_MAX_AGE_S) -> None:
        self.settings = settings
        self.jobs = jobs
        self.usage_max_age_s = usage_max_age_s
        self.sweeps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._usage: tuple[float, dict[str, int]] | None = None

    def sweep(self) -> SweepResult:
        """Sweep now and re-measure the usage."""
        result = sweep(self.settings, self.jobs)
        self.sweeps += 1
        self._measure()
        return result

    def _measure(self) -> dict[str, int]:
        usage = data_dir_usage(self.settings)
        with self._lock:
            self._usage = (time.monotonic(), usage)
        return usage

    def usage(self) -> dict[str, int]:
        """Bytes by kind (see ``data_dir_usage``), at most ``usage_max_age_s`` old."""
        with self._lock:
            cached = self._usage
        if cached is not None and time.monotonic() - cached[0] < self.usage_max_age_s:
            return cached[1]
        return self._measure()

    def start(self) -> None:
        """Sweep periodically until ``stop`` (no thread when the interval is 0)."""
        if self.settings.sweep_interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="care-housekeeping", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval_s):
            try:
                result = self.sweep()
            except Exception:  # never let the thread die: the next interval retries
                logger.exception("housekeeping sweep failed")
                continue
            if result.staging_dirs or result.registry_temp_files or result.ready_uploads:
                logger.info("housekeeping sweep: %s", result)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
