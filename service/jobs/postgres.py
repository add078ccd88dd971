"""The PostgreSQL backend of the job store (``CARE_JOBS_URL=postgresql://…``), on psycopg 3 (the postgres extra).

Same rows and the same SQL as the SQLite backend (service/jobs/db.py); what differs is how concurrent writers are
kept apart. SQLite has one write lock for everything; here transactions run concurrently (READ COMMITTED) and:

* label uniqueness under concurrent submits is the partial unique index ``task_labels_live`` (labels inserted in
  sorted order, so two submits wait for each other instead of deadlocking), and a reused idempotency key the
  UNIQUE ``idempotency_key``: the loser's INSERT fails and the store answers from the winner's committed row;
* claiming takes the transaction-scoped advisory lock ``claim`` (one task trains at a time) and picks the next
  task with ``SELECT … FOR UPDATE SKIP LOCKED``; the lineage lease row is locked ``FOR UPDATE`` while a claim
  checks it, and taken with a conditional upsert (only when free, expired or already the caller's);
* a state change locks its task row (``FOR UPDATE``) before checking the status it changes;
* a submit holds the advisory lock ``uploads`` shared and the orphan sweep holds it exclusively, so the sweep never
  sees an upload directory whose row is about to be committed.

The queue bound (``max_queued``) is checked in each submit's own transaction: submits that run at the same moment
may pass it together, so it can be exceeded by the number of concurrent submits (it is back-pressure, not an
invariant). Durability: every session sets ``synchronous_commit = on``, so COMMIT returns once the WAL is flushed.
The schema is created and migrated by the service itself, tracked in the table ``schema_version`` and serialised
by the advisory lock ``migrate``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import psycopg
from psycopg import errors as pg_errors

from service.jobs.database import Connection, Cursor, JobDatabase, LockName
from service.jobs.db import SCHEMA_VERSION
from service.jobs.errors import JobStoreError

logger = logging.getLogger(__name__)

URL_SCHEMES = ("postgresql://", "postgres://")

# _MIGRATIONS[v] brings the schema from version v to v + 1, as db._MIGRATIONS does for SQLite (the same versions
# mean the same columns); append, never edit, to migrate.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tasks (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- submission order; a sequence never reuses one
            task_id TEXT NOT NULL UNIQUE,
            name TEXT,
            status TEXT NOT NULL CHECK (status IN ('queued', 'training', 'ready', 'failed')),
            classes TEXT NOT NULL,
            num_images INTEGER NOT NULL,
            learned_index INTEGER UNIQUE,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            progress TEXT,
            model_version BIGINT,
            metrics TEXT,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            idempotency_key TEXT UNIQUE
        )""",
        "CREATE INDEX tasks_status_seq ON tasks (status, seq)",
        """CREATE TABLE task_labels (
            task_seq BIGINT NOT NULL REFERENCES tasks (seq) ON DELETE CASCADE,
            label TEXT NOT NULL,
            live INTEGER NOT NULL CHECK (live IN (0, 1)),
            PRIMARY KEY (task_seq, label)
        )""",
        # What decides between concurrent submits of one label: a label can be live in one task only.
        "CREATE UNIQUE INDEX task_labels_live ON task_labels (label) WHERE live = 1",
        "CREATE TABLE leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL)",
    ),
    ("ALTER TABLE tasks ADD COLUMN request_hash TEXT",),
)


def is_postgres_url(target: object) -> bool:
    """Whether a job database setting names a PostgreSQL server (else it is a SQLite file)."""
    return isinstance(target, str) and target.startswith(URL_SCHEMES)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"^(\w+://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key per lock name."""
    return int.from_bytes(hashlib.sha256(f"care-serve.jobs:{name}".encode()).digest()[:8], "big", signed=True)


_LOCK_KEYS = {name: _lock_key(name) for name in ("claim", "uploads", "migrate")}


class Row(tuple[Any, ...]):
    """A result row indexable by position and by column name, as ``sqlite3.Row`` is."""

    _index: dict[str, int]

    def __new__(cls, values: Sequence[Any], index: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(self._index[key])
        return super().__getitem__(key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return functools.partial(Row, index=index)


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """The store's ``?`` placeholders as psycopg's ``%s`` (the store's SQL has no ``?`` or ``%`` of its own)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgConnection:
    """A psycopg connection (autocommit; transactions are explicit) speaking the store's ``Connection`` protocol."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        return self.raw.execute(_pg_sql(sql), tuple(parameters))

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> None:
        with self.raw.cursor() as cursor:
            cursor.executemany(_pg_sql(sql), [tuple(p) for p in parameters])

    def close(self) -> None:
        self.raw.close()


class PostgresDatabase(JobDatabase):
    """The job rows in a PostgreSQL database, for servers and workers on several hosts.

    Args:
        url: ``postgresql://user:password@host:port/dbname?…`` (any libpq connection URL; ``PG*`` variables and
            ``~/.pgpass`` apply as usual).
        busy_timeout_s: Longest wait for a lock (``lock_timeout``) or for a connection, before failing.
    """

    kind = "postgresql"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    error: ClassVar[type[Exception]] = psycopg.Error
    unique_violation: ClassVar[tuple[type[Exception], ...]] = (pg_errors.UniqueViolation,)

    def __init__(self, url: str, busy_timeout_s: float) -> None:
        super().__init__(redact(url))
        self._url = url
        self.busy_timeout_s = busy_timeout_s
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> PgConnection:
        try:
            raw = psycopg.connect(
                self._url,
                autocommit=True,
                row_factory=_row_factory,
                application_name="care-serve",
                connect_timeout=max(1, round(self.busy_timeout_s)),
            )
        except psycopg.OperationalError as e:
            raise JobStoreError(
                f"cannot connect to the job database {self.location}: {str(e).strip()}; check CARE_JOBS_URL and "
                "that the server accepts connections"
            ) from e
        raw.execute("SET synchronous_commit = on")  # a commit is durable before the 202 goes out
        raw.execute(f"SET lock_timeout = {max(1, round(self.busy_timeout_s * 1000))}")
        return PgConnection(raw)

    def _usable(self, conn: Any) -> bool:
        raw = conn.raw
        return not (raw.closed or raw.broken)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[PgConnection]:
        conn = self.connection()
        assert isinstance(conn, PgConnection)
        try:
            with conn.raw.transaction():
                yield conn
        except pg_errors.LockNotAvailable as e:
            raise JobStoreError(
                f"the job database stayed locked for more than {self.busy_timeout_s} s ({str(e).strip()}); another "
                "process holds a long transaction, retry later"
            ) from e

    def write(self) -> contextlib.AbstractContextManager[Connection]:
        return self._transaction()

    def lock(self, conn: Connection, name: LockName) -> None:
        if name == "uploads_shared":
            conn.execute("SELECT pg_advisory_xact_lock_shared(?)", (_LOCK_KEYS["uploads"],))
        else:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_KEYS[name],))

    def _migrate(self) -> None:
        with self.write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_KEYS["migrate"],))  # concurrent openers wait
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), version INTEGER NOT NULL)"
            )
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version: int = 0 if row is None else row[0]
            if version > SCHEMA_VERSION:
                raise JobStoreError(
                    f"the job database has schema version {version}, newer than this code's {SCHEMA_VERSION}; "
                    "upgrade care-serve"
                )
            for target in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                logger.info("job database %s migrated to schema version %d", self.location, target + 1)
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
