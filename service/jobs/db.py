"""Records and shared queries of service.jobs, and its SQLite backend (schema, migrations, connections).

Every query function takes an open connection (``database.Connection``) and is written in SQL that SQLite and
PostgreSQL both accept; ``service.jobs.JobStore`` owns the transactions. ``SQLiteDatabase`` is the embedded
backend; postgres.py is the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from registry.owner import pid_namespace
from service.jobs.database import Connection, JobDatabase, LockName
from service.jobs.errors import InvalidTransition, JobStoreError, LabelConflict, QueueFull, TaskNotFound
from service.jobs.uploads import fsync_dir

logger = logging.getLogger(__name__)

TaskStatus = Literal["queued", "training", "ready", "failed"]
STATUSES: tuple[TaskStatus, ...] = ("queued", "training", "ready", "failed")
SCHEMA_VERSION = 2
DEFAULT_RETRY_AFTER_S = 30.0
_SQL_CHUNK = 500  # stays far below SQLite's limit on bound parameters per statement

# _MIGRATIONS[v] brings the schema from user_version v to v + 1; append, never edit, to migrate.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tasks (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order; AUTOINCREMENT never reuses a value
            task_id TEXT NOT NULL UNIQUE,
            name TEXT,
            status TEXT NOT NULL CHECK (status IN ('queued', 'training', 'ready', 'failed')),
            classes TEXT NOT NULL,                  -- JSON list, order of first appearance
            num_images INTEGER NOT NULL,
            learned_index INTEGER UNIQUE,           -- "index" in the API; set once ready
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            progress TEXT,                          -- JSON object
            model_version INTEGER,
            metrics TEXT,                           -- JSON object
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            owner TEXT,                             -- worker that claimed it last
            idempotency_key TEXT UNIQUE
        )""",
        "CREATE INDEX tasks_status_seq ON tasks (status, seq)",
        """CREATE TABLE task_labels (
            task_seq INTEGER NOT NULL REFERENCES tasks (seq) ON DELETE CASCADE,
            label TEXT NOT NULL,
            live INTEGER NOT NULL CHECK (live IN (0, 1)),  -- 0 once the task failed: the label is free again
            PRIMARY KEY (task_seq, label)
        )""",
        # Second line of defence behind the check in submit(): a label can be live in one task only.
        "CREATE UNIQUE INDEX task_labels_live ON task_labels (label) WHERE live = 1",
        "CREATE TABLE leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL)",
    ),
    (
        # sha256 of what a request with an idempotency key asked for (service.jobs.request_fingerprint); NULL for
        # tasks stored before version 2 or without a key.
        "ALTER TABLE tasks ADD COLUMN request_hash TEXT",
    ),
)


def process_namespace() -> str:
    """Where a pid means something: the host name plus the pid namespace (containers on one host can share names).

    Two owner ids with the same namespace refer to processes that can see each other's pids.
    """
    return f"{socket.gethostname()}-{pid_namespace()}"


def make_owner_id() -> str:
    """A lease/claim owner id unique to this process: ``<host>-<pid namespace>:<pid>:<random>``."""
    return f"{process_namespace()}:{os.getpid()}:{secrets.token_hex(4)}"


def iso(ts: float) -> str:
    """Seconds since the epoch as a UTC ISO-8601 string ending in "Z" (millisecond precision)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class JobRecord:
    """One job row: a submitted task's place and state in the training queue (``registry.TaskRecord`` is another
    thing, a learned task in a registry version). Times are UTC ISO-8601 strings ending in "Z"; ``index`` is set once
    ready."""

    task_id: str
    seq: int
    name: str | None
    status: TaskStatus
    classes: list[str]
    num_images: int
    index: int | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: dict[str, Any] | None
    model_version: int | None
    metrics: dict[str, Any] | None
    error: str | None
    attempts: int
    idempotency_key: str | None
    owner: str | None = None
    request_hash: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        """Build a record from a ``SELECT * FROM tasks`` row (indexable by column name)."""
        return cls(
            task_id=row["task_id"], seq=row["seq"], name=row["name"], status=row["status"],
            classes=json.loads(row["classes"]), num_images=row["num_images"], index=row["learned_index"],
            created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
            progress=_json_or_none(row["progress"]), model_version=row["model_version"],
            metrics=_json_or_none(row["metrics"]), error=row["error"], attempts=row["attempts"],
            idempotency_key=row["idempotency_key"], owner=row["owner"], request_hash=row["request_hash"],
        )  # fmt: skip

    def to_public(self) -> dict[str, Any]:
        """The GET /tasks/{task_id} object of docs/api.md, exactly its fields."""
        return {
            "task_id": self.task_id, "name": self.name, "status": self.status, "classes": list(self.classes),
            "num_images": self.num_images, "index": self.index, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "progress": self.progress,
            "model_version": self.model_version, "metrics": self.metrics, "error": self.error,
        }  # fmt: skip


@dataclass(frozen=True)
class SubmitResult:
    """Outcome of ``JobStore.submit``: the task, whether this call created it, and how many tasks are ahead."""

    record: JobRecord
    created: bool
    position: int


def connect(db_path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """Open a connection in WAL mode with ``synchronous=FULL``, foreign keys and a busy timeout."""
    # isolation_level=None: no implicit transactions; writers issue BEGIN IMMEDIATE themselves (write_transaction).
    conn = sqlite3.connect(db_path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    deadline = time.monotonic() + busy_timeout_s
    while True:  # switching a fresh file to WAL needs an exclusive lock that a concurrent opener may hold
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.01)
    if str(mode).lower() != "wal":
        conn.close()
        raise JobStoreError(f"{db_path}: SQLite refused WAL mode (got {mode!r}); put the job database on a local disk")
    conn.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit: a commit survives power loss
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection, busy_timeout_s: float) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (take the database write lock now) ... ``COMMIT``, or ``ROLLBACK`` on any exception."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        raise JobStoreError(
            f"the job database stayed locked for more than {busy_timeout_s} s ({e}); another process holds a long "
            "write transaction, retry later"
        ) from e
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to ``SCHEMA_VERSION`` (tracked in ``PRAGMA user_version``); the caller holds the write lock."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise JobStoreError(
            f"the job database has schema version {version}, newer than this code's {SCHEMA_VERSION}; upgrade "
            "care-serve"
        )
    for target in range(version, SCHEMA_VERSION):
        for statement in _MIGRATIONS[target]:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {target + 1}")
        logger.info("job database migrated to schema version %d", target + 1)


def fetch_job(conn: Connection, task_id: str) -> JobRecord:
    """The job row of the task with this id; raises TaskNotFound."""
    row = conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
    if row is None:
        raise TaskNotFound(task_id)
    return JobRecord.from_row(row)


def pending_count(conn: Connection, before_seq: int | None = None) -> int:
    """Tasks queued or training (only those submitted before ``before_seq`` when given)."""
    sql = "SELECT COUNT(*) FROM tasks WHERE status IN ('queued', 'training') AND seq < ?"
    n: int = conn.execute(sql, (before_seq if before_seq is not None else 2**63 - 1,)).fetchone()[0]
    return n


def check_admission(conn: Connection, classes: Sequence[str], max_queued: int) -> int:
    """Raise LabelConflict or QueueFull if a task with ``classes`` may not be queued now; else return pending_count."""
    taken: set[str] = set()
    for i in range(0, len(classes), _SQL_CHUNK):
        chunk = list(classes[i : i + _SQL_CHUNK])
        sql = f"SELECT label FROM task_labels WHERE live = 1 AND label IN ({','.join('?' * len(chunk))})"
        taken.update(r[0] for r in conn.execute(sql, chunk))
    if taken:
        raise LabelConflict(taken)
    pending = pending_count(conn)
    if pending >= max_queued:
        raise QueueFull(pending, max_queued, _retry_after_s(conn))
    return pending


def _retry_after_s(conn: Connection) -> float:
    # A queue slot frees up when a task finishes: estimate by the mean duration of the last few trainings.
    rows = conn.execute(
        "SELECT started_at, finished_at FROM tasks WHERE status = 'ready' AND started_at IS NOT NULL "
        "ORDER BY seq DESC LIMIT 5"
    ).fetchall()
    spans = [(datetime.fromisoformat(f) - datetime.fromisoformat(s)).total_seconds() for s, f in rows]
    return min(max(sum(spans) / len(spans), 1.0), 3600.0) if spans else DEFAULT_RETRY_AFTER_S


def check_transition(
    conn: Connection, task_id: str, action: str, allowed: tuple[str, ...], owner: str | None, for_update: str = ""
) -> int:
    """Return the task's seq if ``action`` is allowed from its status (and, when training, by ``owner``).

    ``for_update`` (``JobDatabase.for_update``) locks the row until the transaction ends, so the status checked is
    the status changed.

    Raises:
        TaskNotFound: Unknown task.
        InvalidTransition: The status is not in ``allowed``, or another owner is training the task.
    """
    row = conn.execute("SELECT seq, status, owner FROM tasks WHERE task_id = ?" + for_update, (task_id,)).fetchone()
    if row is None:
        raise TaskNotFound(task_id)
    if row["status"] not in allowed:
        raise InvalidTransition(task_id, action, f"it is {row['status']}, expected {' or '.join(allowed)}")
    if owner is not None and row["status"] == "training" and row["owner"] != owner:
        # Fencing: a trainer whose lease lapsed must not overwrite the task that a new trainer re-claimed.
        raise InvalidTransition(task_id, action, f"it is being trained by {row['owner']}, not {owner}")
    seq: int = row["seq"]
    return seq


def set_failed(conn: Connection, seq: int, error: str, now_iso: str) -> None:
    """Mark a task failed and free its labels."""
    conn.execute("UPDATE tasks SET status = 'failed', finished_at = ?, error = ? WHERE seq = ?", (now_iso, error, seq))
    conn.execute("UPDATE task_labels SET live = 0 WHERE task_seq = ?", (seq,))


def new_task_id(conn: Connection, uploads_dir: Path) -> str:
    """A fresh random task id ("t-" + 12 lowercase hex) used by no row and no upload directory."""
    while True:  # 48 random bits: a collision is astronomically rare, but cheap to rule out
        task_id = f"t-{secrets.token_hex(6)}"
        taken = conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        if taken is None and not (uploads_dir / task_id).exists():
            return task_id


class SQLiteDatabase(JobDatabase):
    """The embedded backend: one SQLite file in WAL mode on a local disk, shared by the processes of one host.

    Every write transaction takes the database's one write lock (``BEGIN IMMEDIATE``), so writers are serialised
    and ``lock`` has nothing to add. Readers never wait for writers (WAL).

    Args:
        db_path: The database file; created with its parent directories when missing.
        busy_timeout_s: How long a statement waits for another process's write lock before failing.
    """

    kind = "sqlite"
    for_update = ""
    skip_locked = ""
    error: ClassVar[type[Exception]] = sqlite3.Error
    unique_violation: ClassVar[tuple[type[Exception], ...]] = (sqlite3.IntegrityError,)

    def __init__(self, db_path: Path, busy_timeout_s: float) -> None:
        super().__init__(str(db_path))
        self.db_path = Path(db_path)
        self.busy_timeout_s = busy_timeout_s
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with write_transaction(self._sqlite(), busy_timeout_s) as conn:  # concurrent openers serialize here
                migrate(conn)
            fsync_dir(self.db_path.parent)  # the database file's own directory entry
        except BaseException:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        return connect(self.db_path, self.busy_timeout_s)

    def _sqlite(self) -> sqlite3.Connection:
        conn = self.connection()
        assert isinstance(conn, sqlite3.Connection)
        return conn

    def write(self) -> contextlib.AbstractContextManager[Connection]:
        return write_transaction(self._sqlite(), self.busy_timeout_s)

    def lock(self, conn: Connection, name: LockName) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already took the one write lock."""
