"""Durable job store behind POST /tasks and the training worker: database rows plus an uploads directory.

The rows live in SQLite in WAL mode (``db.SQLiteDatabase``, the embedded default) or in PostgreSQL
(``postgres.PostgresDatabase``, when the database is a ``postgresql://`` URL); the logic here is written once
against their common interface (``database.JobDatabase``) and what it says each must guarantee.

The API server submits and reads; a worker *process* (kept single per lineage by a lease) claims tasks in
submission order, reports progress and marks them ready or failed. Any process may be SIGKILLed at any moment.

Why a 202 is safe (``submit``): the upload is first written to ``uploads_dir/.staging-<random>/`` with every file
and directory fsynced. Then, inside one write transaction, the checks run again, the staging directory is renamed to
``uploads_dir/<task_id>/`` and its parent fsynced, and the row is inserted and committed; COMMIT returns once it is
durable (SQLite: ``synchronous=FULL``; PostgreSQL: ``synchronous_commit=on``). Two submits racing for one label
or one idempotency key are decided by the UNIQUE constraints (under SQLite's one write lock the re-check already
does). So a row only ever
exists for a complete, durable upload. A crash earlier leaves a staging directory or a ``t-*`` directory without a
row: neither is a task, and ``sweep_staging`` removes both. With a shared upload store (``shared_uploads``: the
registry's bucket, for workers on other hosts) the upload is also put there, under its task id, after staging and
before the transaction, so the row is committed (and the 202 sent) only once both copies are durable; objects whose
task has no row are deleted by ``sweep_staging`` once older than its grace.

Deployment limits: SQLite's WAL uses shared memory, so all processes of one SQLite database must run on one host
with a local filesystem (not NFS/SMB); processes on several hosts share a PostgreSQL database. Leases compare
wall-clock times (``time.time()`` of whichever process writes), so hosts' clocks must agree to well under the TTL.

Typical worker loop::

    if store.acquire_lease("lineage", me, ttl_s=30):
        store.recover_interrupted(max_attempts=3)
        while (task := store.claim_next(me, lease="lineage")) is not None:  # renew_lease() while training
            images, labels = store.load_upload(task.task_id)
            ...  # update_progress(..., owner=me), then mark_ready(..., owner=me) or mark_failed(..., owner=me)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from registry.owner import owner_tag
from service.jobs.database import Connection, JobDatabase
from service.jobs.db import (
    STATUSES,
    JobRecord,
    SQLiteDatabase,
    SubmitResult,
    TaskStatus,
    check_admission,
    check_transition,
    fetch_job,
    iso,
    make_owner_id,
    new_task_id,
    pending_count,
    set_failed,
)
from service.jobs.errors import (
    IdempotencyKeyReused,
    InvalidTransition,
    JobStoreError,
    LabelConflict,
    QueueFull,
    TaskNotFound,
    UploadCorrupt,
)
from service.jobs.shared_uploads import LocalUploads, UploadStore
from service.jobs.uploads import (
    MANIFEST_NAME,
    STAGING_PREFIX,
    publish_staged,
    read_upload,
    remove_tree,
    retire,
    stage_upload,
    stale_staging_dirs,
)

__all__ = [
    "IdempotencyKeyReused",
    "InvalidTransition",
    "JobRecord",
    "JobStore",
    "JobStoreError",
    "LabelConflict",
    "QueueFull",
    "SubmitResult",
    "TaskNotFound",
    "TaskStatus",
    "UploadCorrupt",
    "make_owner_id",
    "open_database",
    "open_upload_store",
    "request_fingerprint",
]

logger = logging.getLogger(__name__)

_TASK_ID = re.compile(r"t-[0-9a-f]{12}")


def request_fingerprint(images: Sequence[tuple[str, bytes]], labels: Sequence[str], name: str | None) -> str:
    """sha256 of what a task request asks for: each image's sha256, the labels and the name, in order.

    File names are left out (they are only for messages), and so is the transport: a retry with a fresh multipart
    boundary or as a zip instead of parts asks for the same task.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps({"labels": list(labels), "name": name}).encode("ascii"))
    for _, data in images:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def open_database(target: Path | str, busy_timeout_s: float) -> JobDatabase:
    """The job database ``target`` names: a ``postgresql://`` URL (psycopg, the postgres extra) or a SQLite file."""
    if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
        try:
            from service.jobs.postgres import PostgresDatabase
        except ImportError as e:
            raise JobStoreError(
                f"the job database is a PostgreSQL URL but its driver is missing ({e}); install it with "
                "pip install 'care-serve[postgres]'"
            ) from e
        return PostgresDatabase(target, busy_timeout_s)
    return SQLiteDatabase(Path(target), busy_timeout_s)


def open_upload_store(registry_url: str | None, endpoint_url: str | None = None) -> UploadStore:
    """The upload store that goes with the registry: ``S3Uploads`` in its bucket when it is on S3, else none.

    boto3 (the ``s3`` extra) is imported only when it is used.
    """
    if registry_url is None:
        return LocalUploads()
    from service.jobs.s3_uploads import S3Uploads

    return S3Uploads.from_url(registry_url, endpoint_url=endpoint_url)


class JobStore:
    """Durable task queue, task states, uploads and worker leases, shared by the server and worker processes.

    Thread-safe: each thread gets its own database connection. Writes run in short transactions; SQLite's readers
    never wait for them (WAL), nor do PostgreSQL's (MVCC).

    Args:
        db: The job database: a SQLite file (created with its parent directories when missing) or a
            ``postgresql://`` URL (``CARE_JOBS_URL``); either way the schema is created and migrated here.
        uploads_dir: Directory of the stored uploads; created when missing.
        busy_timeout_s: How long a statement waits for another process's lock before failing.
        clock: Wall-clock time in seconds since the epoch, for timestamps and lease expiry (tests pass a fake).
        keep_uploads: Keep a task's upload once it is marked ready; when False (the service's default,
            ``CARE_KEEP_UPLOADS``) ``mark_ready`` deletes it, since nothing reads it again.
        shared_uploads: Where uploads are also stored for workers on other hosts (shared_uploads.py): the default
            ``LocalUploads`` stores nothing beyond ``uploads_dir``; ``S3Uploads`` puts each upload to the bucket
            before its row is committed, and ``load_upload`` reads it from there when ``uploads_dir`` lacks it.
    """

    def __init__(
        self,
        db: Path | str,
        uploads_dir: Path,
        *,
        busy_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        keep_uploads: bool = True,
        shared_uploads: UploadStore | None = None,
    ) -> None:
        self.uploads_dir = Path(uploads_dir)
        self.keep_uploads = keep_uploads
        self.shared_uploads = shared_uploads if shared_uploads is not None else LocalUploads()
        self._clock = clock
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._db = open_database(db, busy_timeout_s)

    @property
    def database(self) -> JobDatabase:
        """The database backend holding the rows (``kind`` says which)."""
        return self._db

    # -- connections and transactions ------------------------------------------------------------------------

    def _conn(self) -> Connection:
        return self._db.connection()

    def _write(self) -> contextlib.AbstractContextManager[Connection]:
        return self._db.write()

    def close(self) -> None:
        """Close every connection of this store; call it once no thread uses the store any more."""
        self._db.close()

    # -- submission -------------------------------------------------------------------------------------------

    def submit(
        self,
        images: Sequence[tuple[str, bytes]],
        labels: Sequence[str],
        *,
        name: str | None,
        idempotency_key: str | None,
        max_queued: int,
    ) -> SubmitResult:
        """Store an upload and queue its task durably; when this returns, a crash cannot lose the task.

        Args:
            images: (original file name, raw bytes) per image, already validated by the caller.
            labels: One label per image; the task's classes are the distinct labels in order of first appearance.
            name: Optional display name.
            idempotency_key: A retry with the same key and the same request (images, labels, name) returns the
                existing task and writes nothing; the same key with another request raises IdempotencyKeyReused.
            max_queued: Bound on tasks queued or training (this one included).

        Returns:
            The task, ``created`` (False for an idempotent retry) and ``position`` (tasks ahead of it; 0 = next).

        Raises:
            LabelConflict: A class is already used by a queued, training or ready task.
            QueueFull: ``max_queued`` tasks are already queued or training.
            IdempotencyKeyReused: The key was first used with a different request.
            ValueError: No images, or not one label per image.
        """
        if not images or len(images) != len(labels):
            raise ValueError(f"need one label per image and at least one image, got {len(images)} and {len(labels)}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        classes = list(dict.fromkeys(labels))
        fingerprint = None if idempotency_key is None else request_fingerprint(images, labels, name)
        if idempotency_key is not None and (done := self._by_key(self._conn(), idempotency_key, fingerprint)):
            return done
        # Cheap checks before writing a possibly large upload; repeated in the write transaction below.
        check_admission(self._conn(), classes, max_queued)
        staging = stage_upload(self.uploads_dir, images, labels, classes)
        final: Path | None = None
        shared_id: str | None = None  # the task id an upload was put to the shared store under
        try:
            if self.shared_uploads.shared:
                # Outside the transaction (a slow network write must not hold the database's locks), under an id
                # chosen now; the row is committed only after the put returned, so a 202 is sent only then.
                shared_id = new_task_id(self._conn(), self.uploads_dir)
                self.shared_uploads.put(shared_id, staging)
            with self._write() as conn:
                self._db.lock(conn, "uploads_shared")  # keeps sweep_staging out until this row is committed
                winner = None if idempotency_key is None else self._by_key(conn, idempotency_key, fingerprint)
                if winner is None:
                    pending = check_admission(conn, classes, max_queued)
                    task_id = shared_id if shared_id is not None else new_task_id(conn, self.uploads_dir)
                    final = self.uploads_dir / task_id
                    publish_staged(staging, final)
                    row = (task_id, name, json.dumps(classes), len(images), iso(self._clock()), idempotency_key)
                    seq = conn.execute(
                        "INSERT INTO tasks (task_id, name, status, classes, num_images, created_at, idempotency_key,"
                        " request_hash) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?) RETURNING seq",
                        (*row, fingerprint),
                    ).fetchall()[0][0]
                    # Sorted: two submits sharing labels then wait on the same first one instead of deadlocking.
                    conn.executemany(
                        "INSERT INTO task_labels (task_seq, label, live) VALUES (?, ?, 1)",
                        [(seq, c) for c in sorted(classes)],
                    )
                    result = SubmitResult(fetch_job(conn, task_id), created=True, position=pending)
        except BaseException as exc:
            remove_tree(staging)  # a no-op once renamed
            if final is not None:
                self._discard_unless_committed(final)
            elif shared_id is not None:  # no row can name it
                self._delete_shared(shared_id)
            if not isinstance(exc, self._db.unique_violation):
                raise
            # A concurrent submit committed this idempotency key or one of these labels first, and the constraint
            # refused ours (PostgreSQL runs submits concurrently; SQLite's write lock lets the re-check decide).
            return self._lost_race(exc, classes, idempotency_key, fingerprint)
        if winner is not None:  # a concurrent retry with the same key committed first
            remove_tree(staging)
            if shared_id is not None:
                self._delete_shared(shared_id)
            return winner
        logger.info(
            "task %s queued: %d classes, %d images, position %d", task_id, len(classes), len(images), result.position
        )
        return result

    def _lost_race(
        self, exc: Exception, classes: Sequence[str], idempotency_key: str | None, fingerprint: str | None
    ) -> SubmitResult:
        """Answer a submit that a UNIQUE constraint refused: the winner's task for the same key, else LabelConflict."""
        conn = self._conn()
        if idempotency_key is not None and (winner := self._by_key(conn, idempotency_key, fingerprint)):
            logger.info("a concurrent retry with the same idempotency key created task %s", winner.record.task_id)
            return winner
        taken = self.known_labels() & set(classes)
        if taken:
            raise LabelConflict(taken) from exc
        raise exc

    def _by_key(self, conn: Connection, key: str, fingerprint: str | None) -> SubmitResult | None:
        row = conn.execute("SELECT * FROM tasks WHERE idempotency_key = ?", (key,)).fetchone()
        if row is None:
            return None
        record = JobRecord.from_row(row)
        # Tasks stored before request hashes existed (NULL) cannot be compared: the key alone decides for them.
        if record.request_hash is not None and record.request_hash != fingerprint:
            raise IdempotencyKeyReused(key, record.task_id)
        return SubmitResult(record, created=False, position=pending_count(conn, row["seq"]))

    def _discard_unless_committed(self, final: Path) -> None:
        # The failure may have come from COMMIT itself; only remove the upload if no row refers to it.
        try:
            row = self._conn().execute("SELECT 1 FROM tasks WHERE task_id = ?", (final.name,)).fetchone()
        except self._db.error:
            logger.warning("cannot tell whether task %s was committed; keeping %s for sweep_staging", final.name, final)
            return
        if row is None:
            retire(final)
            if self.shared_uploads.shared:
                self._delete_shared(final.name)

    def _delete_shared(self, task_id: str) -> None:
        """Delete an upload from the shared store; a failure is logged (``sweep_staging`` and the ready sweep retry)."""
        try:
            self.shared_uploads.delete(task_id)
        except Exception:
            logger.warning(
                "could not delete the upload of %s from %r; a sweep retries",
                task_id,
                self.shared_uploads,
                exc_info=True,
            )

    def known_labels(self) -> set[str]:
        """Labels of every queued, training or ready task (those a new task may not use)."""
        return {r[0] for r in self._conn().execute("SELECT label FROM task_labels WHERE live = 1")}

    def pending_count(self) -> int:
        """Number of tasks queued or training."""
        return pending_count(self._conn())

    # -- reading ----------------------------------------------------------------------------------------------

    def get(self, task_id: str) -> JobRecord:
        """The task with this id; raises TaskNotFound."""
        return fetch_job(self._conn(), task_id)

    def list_tasks(self) -> list[JobRecord]:
        """All tasks in submission order."""
        return [JobRecord.from_row(r) for r in self._conn().execute("SELECT * FROM tasks ORDER BY seq")]

    def counts_by_status(self) -> dict[str, int]:
        """Number of tasks per status; every status is present, zeros included."""
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        counts.update(self._conn().execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall())
        return counts

    def _task_dir(self, task_id: str) -> Path:
        if not _TASK_ID.fullmatch(task_id):  # never build a path from an id we did not generate
            raise TaskNotFound(task_id)
        return self.uploads_dir / task_id

    def load_upload(self, task_id: str) -> tuple[list[bytes], list[str]]:
        """The task's images in upload order and their labels, each image checked against its sha256.

        Raises:
            TaskNotFound: Unknown task.
            UploadCorrupt: Naming the file that is missing or altered.
        """
        task_dir = self._task_dir(task_id)
        self.get(task_id)
        if self.shared_uploads.shared and not task_dir.exists():
            self._fetch_shared(task_id, task_dir)
        return read_upload(task_dir, task_id)

    def _fetch_shared(self, task_id: str, task_dir: Path) -> None:
        """Copy an upload this host does not have from the shared store into ``task_dir`` (staged, then renamed)."""
        staging = self.uploads_dir / f"{STAGING_PREFIX}{owner_tag()}-{secrets.token_hex(8)}"
        staging.mkdir()
        try:
            if not self.shared_uploads.fetch(task_id, staging):
                raise UploadCorrupt(
                    task_id, MANIFEST_NAME, f"in neither {self.uploads_dir} nor {self.shared_uploads!r}"
                )
            try:
                publish_staged(staging, task_dir)
            except OSError:  # another thread of this host fetched it first
                if not task_dir.exists():
                    raise
        finally:
            remove_tree(staging)  # a no-op once renamed

    def delete_upload(self, task_id: str) -> None:
        """Delete the stored upload of a finished (ready or failed) task; raises InvalidTransition if pending."""
        task_dir = self._task_dir(task_id)
        record = self.get(task_id)
        if record.status in ("queued", "training"):
            raise InvalidTransition(task_id, "delete the upload of", f"it is {record.status} and still needs it")
        retire(task_dir)
        if self.shared_uploads.shared:
            self.shared_uploads.delete(task_id)

    def delete_ready_uploads(self) -> int:
        """Delete the stored uploads of ready tasks (those ``mark_ready`` kept, or lost to a crash right after it).

        Returns:
            How many uploads were deleted.
        """
        deleted = 0
        for path in self.uploads_dir.iterdir():
            if not _TASK_ID.fullmatch(path.name):
                continue
            row = self._conn().execute("SELECT status FROM tasks WHERE task_id = ?", (path.name,)).fetchone()
            if row is not None and row["status"] == "ready":  # no row: a submit in flight, or sweep_staging's
                retire(path)
                deleted += 1
        for task_id in self.shared_uploads.stored():
            if not _TASK_ID.fullmatch(task_id):
                continue
            row = self._conn().execute("SELECT status FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is not None and row["status"] == "ready":
                self.shared_uploads.delete(task_id)
                deleted += 1
        if deleted:
            logger.info("deleted the uploads of %d ready task(s)", deleted)
        return deleted

    def sweep_staging(self, older_than_s: float) -> int:
        """Remove leftovers of crashed submits: staging directories and upload directories that no task owns.

        Args:
            older_than_s: Only staging directories unchanged for this long are removed; keep it well above the
                time a submit takes (e.g. an hour), since another process may be writing one right now.

        Returns:
            How many directories were removed.
        """
        removed = 0
        for staging in stale_staging_dirs(self.uploads_dir, older_than_s):
            remove_tree(staging)
            removed += 1
        candidates = [p for p in self.uploads_dir.iterdir() if _TASK_ID.fullmatch(p.name)]
        orphans = []
        # Under the write lock no submit is between its rename and its commit, so a directory without a row
        # can only come from a crash in that window.
        with self._write() as conn:
            self._db.lock(conn, "uploads")
            for path in candidates:
                if conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (path.name,)).fetchone() is None:
                    trash = self.uploads_dir / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
                    with contextlib.suppress(FileNotFoundError):  # its failed submit may be removing it
                        os.rename(path, trash)  # cheap under the lock; the slow delete runs after COMMIT
                        orphans.append(trash)
        for trash in orphans:
            remove_tree(trash)
        # Shared objects are put before their row exists, outside any lock: only age tells a submit in flight apart.
        cutoff = time.time() - older_than_s  # object times are wall-clock time, whatever clock the store uses
        for task_id, newest in self.shared_uploads.stored().items():
            if (
                newest < cutoff
                and _TASK_ID.fullmatch(task_id)
                and self._conn().execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone() is None
            ):
                self.shared_uploads.delete(task_id)
                removed += 1
        if removed or orphans:
            logger.info("swept %d staging and %d orphan upload directories", removed, len(orphans))
        return removed + len(orphans)

    # -- worker side: leases ----------------------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take the lease ``name`` for ``ttl_s`` seconds if it is free, expired or already ``owner``'s."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        with self._write() as conn:
            now = self._clock()
            sql = "SELECT owner, expires_at FROM leases WHERE name = ?" + self._db.for_update
            row = conn.execute(sql, (name,)).fetchone()
            if row is not None and row["owner"] != owner and row["expires_at"] > now:
                return False
            # Conditional: when two takers race for a lease that did not exist yet, only the first INSERT wins.
            taken = conn.execute(
                "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at "
                "WHERE leases.owner = excluded.owner OR leases.expires_at <= ? RETURNING owner",
                (name, owner, now + ttl_s, now),
            ).fetchall()
        if not taken:
            return False
        if row is not None and row["owner"] != owner:
            logger.warning("lease %s taken over by %s from %s, whose lease had expired", name, owner, row["owner"])
        return True

    def renew_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Extend ``owner``'s lease; False means it was lost (taken or released) and the owner must stop.

        A lease that expired but was taken by nobody is still renewed: any taker would have replaced the owner.
        """
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE leases SET expires_at = ? WHERE name = ? AND owner = ?", (self._clock() + ttl_s, name, owner)
            )
        return cur.rowcount == 1

    def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it."""
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def lease_holder(self, name: str) -> str | None:
        """The owner of an unexpired lease ``name``, or None."""
        sql = "SELECT owner FROM leases WHERE name = ? AND expires_at > ?"
        row = self._conn().execute(sql, (name, self._clock())).fetchone()
        return None if row is None else str(row[0])

    # -- worker side: task states -----------------------------------------------------------------------------

    def claim_next(self, owner: str, *, lease: str | None = None) -> JobRecord | None:
        """Mark the oldest queued task training for ``owner``.

        Args:
            owner: The claiming worker; recorded on the task (see the ``owner`` fencing of the ``mark_*`` methods).
            lease: When given, claim only if ``owner`` holds this unexpired lease, checked in the same transaction.

        Returns:
            The claimed task, or None if the queue is empty, a task is already training, or the lease is not held.
        """
        with self._write() as conn:
            self._db.lock(conn, "claim")
            if conn.execute("SELECT 1 FROM tasks WHERE status = 'training' LIMIT 1").fetchone() is not None:
                return None
            if lease is not None:  # the lease row stays locked: nobody takes it over before this claim commits
                held = conn.execute(
                    "SELECT 1 FROM leases WHERE name = ? AND owner = ? AND expires_at > ?" + self._db.for_update,
                    (lease, owner, self._clock()),
                ).fetchone()
                if held is None:
                    return None
            sql = "SELECT task_id FROM tasks WHERE status = 'queued' ORDER BY seq LIMIT 1" + self._db.skip_locked
            row = conn.execute(sql).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE tasks SET status = 'training', started_at = ?, finished_at = NULL, attempts = attempts + 1,"
                " owner = ?, progress = NULL, error = NULL WHERE task_id = ?",
                (iso(self._clock()), owner, row["task_id"]),
            )
            record = fetch_job(conn, row["task_id"])
        logger.info("task %s claimed by %s (attempt %d)", record.task_id, owner, record.attempts)
        return record

    def recover_interrupted(self, *, max_attempts: int | None = None) -> list[str]:
        """Put tasks left "training" by a dead trainer back in the queue, keeping their place (seq).

        Call only while holding the lineage lease: it assumes nobody is training. A task whose trainer died
        ``max_attempts`` times (it may be what kills it) is marked failed instead, so the queue moves on.

        Returns:
            The ids of the re-queued tasks.
        """
        requeued = []
        with self._write() as conn:
            self._db.lock(conn, "claim")
            sql = (
                "SELECT seq, task_id, attempts FROM tasks WHERE status = 'training' ORDER BY seq" + self._db.for_update
            )
            for row in conn.execute(sql).fetchall():
                if max_attempts is not None and row["attempts"] >= max_attempts:
                    error = f"the trainer stopped {row['attempts']} times while training this task; submit it again"
                    set_failed(conn, row["seq"], error, iso(self._clock()))
                    logger.error("task %s failed: %s", row["task_id"], error)
                else:
                    conn.execute(
                        "UPDATE tasks SET status = 'queued', started_at = NULL, owner = NULL, progress = NULL"
                        " WHERE seq = ?",
                        (row["seq"],),
                    )
                    requeued.append(row["task_id"])
        if requeued:
            logger.warning("re-queued tasks interrupted by a dead trainer: %s", requeued)
        return requeued

    def update_progress(self, task_id: str, progress: dict[str, Any], *, owner: str | None = None) -> None:
        """Replace the progress of a training task (epoch, epochs, step, steps, loss, stage...).

        Args:
            owner: When given, the update is refused unless this owner claimed the task.
        """
        data = json.dumps(progress)
        with self._write() as conn:
            seq = check_transition(conn, task_id, "update the progress of", ("training",), owner, self._db.for_update)
            conn.execute("UPDATE tasks SET progress = ? WHERE seq = ?", (data, seq))

    def mark_ready(
        self, task_id: str, *, index: int, model_version: int, metrics: dict[str, Any], owner: str | None = None
    ) -> None:
        """Record that a training task was learned as position ``index`` of the lineage in ``model_version``."""
        data = json.dumps(metrics)
        with self._write() as conn:
            seq = check_transition(conn, task_id, "mark_ready", ("training",), owner, self._db.for_update)
            clash = conn.execute("SELECT task_id FROM tasks WHERE learned_index = ?", (index,)).fetchone()
            if clash is not None:
                raise InvalidTransition(task_id, "mark_ready", f"index {index} already belongs to task {clash[0]}")
            conn.execute(
                "UPDATE tasks SET status = 'ready', finished_at = ?, learned_index = ?, model_version = ?,"
                " metrics = ? WHERE seq = ?",
                (iso(self._clock()), index, model_version, data, seq),
            )
        logger.info("task %s ready: index %d, model version %d", task_id, index, model_version)
        if not self.keep_uploads:
            try:  # after the commit: the task is ready whatever happens here, and nothing reads its upload again
                retire(self._task_dir(task_id))
            except OSError:
                logger.warning("could not delete the upload of %s; the next sweep retries", task_id, exc_info=True)
            if self.shared_uploads.shared:
                self._delete_shared(task_id)

    def mark_failed(self, task_id: str, error: str, *, owner: str | None = None) -> None:
        """Record that a queued or training task failed; its labels become free again."""
        with self._write() as conn:
            seq = check_transition(conn, task_id, "mark_failed", ("queued", "training"), owner, self._db.for_update)
            set_failed(conn, seq, error, iso(self._clock()))
        logger.warning("task %s failed: %s", task_id, error)
