"""The interface between ``service.jobs.JobStore`` and the database that holds its rows.

``JobStore`` (store.py) is written once, in SQL that SQLite and PostgreSQL both accept, against the small interface
here: a thread's connection, a write transaction, a named lock inside one, and the few words in which the two
dialects differ. Two implementations: ``db.SQLiteDatabase`` (a file in WAL mode, the embedded default) and
``postgres.PostgresDatabase`` (``CARE_JOBS_URL=postgresql://…``). Statements use ``?`` placeholders; the
PostgreSQL connection translates them.

What a backend must guarantee (the store relies on it):

* ``write()`` commits durably before it returns (a 202 is only sent after it), and rolls back on any exception.
* ``lock(conn, name)`` inside ``write()`` serialises the transactions that take the same lock name until they end
  (``"claim"``: claiming and re-queueing; ``"uploads"``: the sweep of orphan uploads, which must not run between a
  submit's rename and its commit, and ``"uploads_shared"``: a submit, which excludes that sweep but not other
  submits). SQLite holds one write lock for every transaction, so its ``lock`` does nothing.
* ``for_update`` is appended to a ``SELECT`` whose rows the transaction is about to change on the strength of what
  it read (PostgreSQL row locks; empty for SQLite), and ``skip_locked`` to the claim of the next queued task.
* ``unique_violation`` names the exceptions that a UNIQUE constraint raises, so the store can answer a lost race
  (two submits of one label, or of one idempotency key) from the constraint instead of a read-then-write.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, Literal, Protocol

from service.jobs.errors import JobStoreError

LockName = Literal["claim", "uploads", "uploads_shared"]


class Cursor(Protocol):
    """What a statement returns: rows (indexable by position and by column name) and the count of changed rows."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A connection as the store uses it: ``sqlite3.Connection``, or the PostgreSQL adapter of postgres.py."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...


class JobDatabase(ABC):
    """Where the job rows live: per-thread connections, write transactions, locks and the dialect's differences.

    The schema is created and migrated to ``db.SCHEMA_VERSION`` when the database is opened.

    Attributes:
        kind: "sqlite" or "postgresql".
        location: The database for messages (a file path, or a URL without its password).
        for_update: Suffix of a ``SELECT`` that locks the rows it reads until the transaction ends.
        skip_locked: Suffix of the ``SELECT`` that picks the next queued task to claim.
        error: Base class of the driver's exceptions.
        unique_violation: The exceptions of a violated UNIQUE constraint.
    """

    kind: ClassVar[str]
    for_update: ClassVar[str]
    skip_locked: ClassVar[str]
    error: ClassVar[type[Exception]]
    unique_violation: ClassVar[tuple[type[Exception], ...]]

    def __init__(self, location: str) -> None:
        self.location = location
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: dict[int, tuple[threading.Thread, Any]] = {}
        self._closed = False

    # -- what a backend implements ----------------------------------------------------------------------------

    @abstractmethod
    def _connect(self) -> Any:
        """A new connection (a ``Connection``, with ``close()``)."""

    def _usable(self, conn: Any) -> bool:  # noqa: ARG002 - a backend whose connections can break overrides it
        """Whether a thread's cached connection can still be used (False: open a new one)."""
        return True

    @abstractmethod
    def write(self) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction on this thread's connection: commit (durably) on exit, roll back on an exception."""

    @abstractmethod
    def lock(self, conn: Connection, name: LockName) -> None:
        """Inside ``write()``: wait for the lock ``name`` and hold it until the transaction ends."""

    # -- connections ------------------------------------------------------------------------------------------

    def connection(self) -> Connection:
        """This thread's connection (each thread has its own; connections of ended threads are closed)."""
        if self._closed:
            raise JobStoreError(f"the job store on {self.location} is closed; create a new JobStore")
        conn = getattr(self._local, "conn", None)
        if conn is not None and not self._usable(conn):
            with self._lock, contextlib.suppress(Exception):
                self._conns.pop(threading.get_ident(), None)
                conn.close()
            conn = None
        if conn is None:
            conn = self._connect()
            with self._lock:
                # Close connections of threads that ended (their idents may be reused by new threads).
                for ident, (thread, old) in list(self._conns.items()):
                    if not thread.is_alive():
                        old.close()
                        del self._conns[ident]
                self._conns[threading.get_ident()] = (threading.current_thread(), conn)
            self._local.conn = conn
        result: Connection = conn
        return result

    def close(self) -> None:
        """Close every connection; call it once no thread uses the database any more."""
        with self._lock:
            self._closed = True
            for _, conn in self._conns.values():
                conn.close()
            self._conns.clear()
