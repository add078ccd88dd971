"""Tests for service.jobs: durable submission, idempotency, admission checks, claim order, crash recovery, leases.

The contract runs against both backends (the ``db`` fixture): a real SQLite file under tmp_path, and a fresh
database on a real PostgreSQL server on loopback (tests/postgres.py; skipped where Debian's `postgresql` package is
missing). Upload directories are real too. Time-dependent behaviour (lease expiry, timestamps, Retry-After
estimates) runs on a fake clock; concurrency tests meet at ``threading.Barrier``s and nothing sleeps to wait for a
state change. One test SIGKILLs a child process in the middle of a loop of submits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import service.jobs.db as jobs_db
import service.jobs.store as jobs
from service.jobs import (
    IdempotencyKeyReused,
    InvalidTransition,
    JobStore,
    JobStoreError,
    LabelConflict,
    QueueFull,
    SubmitResult,
    TaskNotFound,
    UploadCorrupt,
)
from service.jobs import uploads as jobs_uploads
from service.jobs.db import DEFAULT_RETRY_AFTER_S, SCHEMA_VERSION
from tests.postgres import PostgresServer

REPO_ROOT = Path(__file__).resolve().parents[3]
WAIT_S = 10.0  # upper bound for anything a test waits on; a healthy run needs milliseconds
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
PUBLIC_FIELDS = {
    "task_id", "name", "status", "classes", "num_images", "index", "created_at", "started_at", "finished_at",
    "progress", "model_version", "metrics", "error",
}  # fmt: skip


class FakeClock:
    """Wall clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


Db = Path | str  # a SQLite file or a postgresql:// URL
Paths = tuple[Db, Path]
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Db]:
    """The job database of one test: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if backend == "sqlite":
        yield tmp_path / "db" / "jobs.sqlite3"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    with server.database() as url:
        yield url


@pytest.fixture
def paths(db: Db, tmp_path: Path) -> Paths:
    return db, tmp_path / "uploads"


def raw_sql(db: Db, *statements: str) -> list[Any]:
    """Run statements on a connection of its own (another process's, in effect); the rows of the last one."""
    rows: list[Any] = []
    if isinstance(db, Path):
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as sq:
            for statement in statements:
                rows = sq.execute(statement).fetchall()
        return rows
    import psycopg

    with psycopg.connect(db, autocommit=True) as pg:
        for statement in statements:
            cur = pg.execute(statement)
            rows = cur.fetchall() if cur.description else []
    return rows


@pytest.fixture
def open_store(paths: Paths, clock: FakeClock) -> Iterator[Callable[..., JobStore]]:
    """Factory of stores on the same files (each a separate set of connections, like another process)."""
    opened: list[JobStore] = []

    def make(**kwargs: Any) -> JobStore:
        store = JobStore(*paths, clock=clock, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., JobStore]) -> JobStore:
    return open_store()


def images_for(labels: list[str], tag: str = "") -> list[tuple[str, bytes]]:
    """Distinct, deterministic image bytes per position (content is irrelevant to the store)."""
    return [(f"img{i}.png", f"{tag}|{i}|{label}|".encode() * 64) for i, label in enumerate(labels)]


def submit(store: JobStore, labels: list[str], *, key: str | None = None, max_queued: int = 100) -> SubmitResult:
    return store.submit(images_for(labels), labels, name=None, idempotency_key=key, max_queued=max_queued)


def upload_entries(uploads: Path) -> set[str]:
    return {p.name for p in uploads.iterdir()}


def run_to(store: JobStore, task_id: str, status: str) -> None:
    """Drive a queued task (the oldest one) to ``status`` through the worker API."""
    if status == "queued":
        return
    claimed = store.claim_next("w")
    assert claimed is not None and claimed.task_id == task_id
    if status == "ready":
        store.mark_ready(task_id, index=store.counts_by_status()["ready"], model_version=1, metrics={})
    elif status == "failed":
        store.mark_failed(task_id, "boom")


# -- submission and reading ------------------------------------------------------------------------------------


def test_submit_get_list_round_trip(store: JobStore, paths: Paths) -> None:
    labels = ["cat", "dog", "cat", "emu"]
    first = store.submit(images_for(labels), labels, name="pets", idempotency_key=None, max_queued=10)
    second = submit(store, ["owl"])

    rec = first.record
    assert first.created and first.position == 0 and second.position == 1
    assert rec.task_id.startswith("t-") and len(rec.task_id) == 14 and int(rec.task_id[2:], 16) >= 0
    assert rec.task_id == rec.task_id.lower() and rec.task_id != second.record.task_id
    assert (rec.status, rec.classes, rec.num_images, rec.name) == ("queued", ["cat", "dog", "emu"], 4, "pets")
    assert rec.created_at == "2026-01-01T00:00:00.000Z"
    assert (rec.started_at, rec.finished_at, rec.index, rec.progress, rec.attempts) == (None, None, None, None, 0)
    assert second.record.seq > rec.seq

    assert store.get(rec.task_id) == rec
    assert [r.task_id for r in store.list_tasks()] == [rec.task_id, second.record.task_id]
    public = rec.to_public()
    assert set(public) == PUBLIC_FIELDS
    assert public["classes"] == ["cat", "dog", "emu"] and public["index"] is None
    json.dumps(public)  # must be JSON-serializable as is
    assert store.counts_by_status() == {"queued": 2, "training": 0, "ready": 0, "failed": 0}
    assert store.known_labels() == {"cat", "dog", "emu", "owl"}
    assert store.pending_count() == 2
    assert upload_entries(paths[1]) == {rec.task_id, second.record.task_id}


def test_submission_is_durable_for_a_new_store_instance(
    store: JobStore, open_store: Callable[..., JobStore], paths: Paths
) -> None:
    labels = ["a", "b", "a"]
    task_id = submit(store, labels).record.task_id

    other = open_store()  # fresh connections; the first store is not even closed
    assert other.get(task_id).classes == ["a", "b"]
    images, got_labels = other.load_upload(task_id)
    assert images == [data for _, data in images_for(labels)]
    assert got_labels == labels
    manifest = json.loads((paths[1] / task_id / "upload.json").read_text())
    assert [e["name"] for e in manifest["images"]] == ["img0.png", "img1.png", "img2.png"]
    if isinstance(paths[0], Path):
        assert raw_sql(paths[0], "PRAGMA journal_mode")[0][0] == "wal"
        assert raw_sql(paths[0], "PRAGMA user_version")[0][0] == SCHEMA_VERSION
    else:
        assert raw_sql(paths[0], "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
        assert other.database.connection().execute("SHOW synchronous_commit").fetchone()[0] == "on"


def test_idempotent_retry_returns_the_same_task_and_writes_nothing(store: JobStore, paths: Paths) -> None:
    first = submit(store, ["x", "y"], key="k1")
    before = upload_entries(paths[1])
    retry = submit(store, ["x", "y"], key="k1")
    renamed = [(f"other-{name}", data) for name, data in images_for(["x", "y"])]  # file names are not the request
    same_content = store.submit(renamed, ["x", "y"], name=None, idempotency_key="k1", max_queued=100)
    with pytest.raises(IdempotencyKeyReused) as reused:
        submit(store, ["z"], key="k1")  # another request under the same key: refused, nothing stored
    with pytest.raises(IdempotencyKeyReused):
        store.submit(images_for(["x", "y"]), ["x", "y"], name="other", idempotency_key="k1", max_queued=100)

    assert first.created and not retry.created and not same_content.created
    assert retry.record == first.record == same_content.record
    assert reused.value.task_id == first.record.task_id
    assert len(store.list_tasks()) == 1
    assert upload_entries(paths[1]) == before == {first.record.task_id}
    assert submit(store, ["z"], key="k2").record.task_id != first.record.task_id


def test_concurrent_idempotent_submits_create_one_task(
    open_store: Callable[..., JobStore], paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both submits must pass the early key lookup before either commits: hold each one after staging until the
    # other has staged too, so the re-check under the write lock is what decides.
    barrier = threading.Barrier(2, timeout=WAIT_S)
    real_stage = jobs_uploads.stage_upload

    def stage_then_meet(*args: Any) -> Path:
        staged = real_stage(*args)
        barrier.wait()
        return staged

    monkeypatch.setattr(jobs, "stage_upload", stage_then_meet)
    stores = [open_store(), open_store()]
    results: list[SubmitResult] = []
    errors: list[BaseException] = []

    def run(s: JobStore) -> None:
        try:
            results.append(submit(s, ["p", "q"], key="same"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not errors and len(results) == 2
    assert sorted(r.created for r in results) == [False, True]
    assert results[0].record.task_id == results[1].record.task_id
    assert len(stores[0].list_tasks()) == 1
    assert upload_entries(paths[1]) == {results[0].record.task_id}  # the loser's staging dir is gone


def test_threads_share_one_store(store: JobStore) -> None:
    def work(n: int) -> None:
        for i in range(4):
            submit(store, [f"t{n}-{i}"])
            store.list_tasks()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    records = store.list_tasks()
    assert len(records) == 16 and len({r.seq for r in records}) == 16
    assert [r.seq for r in records] == sorted(r.seq for r in records)


def test_concurrent_construction_on_a_fresh_database(paths: Paths) -> None:
    barrier = threading.Barrier(4, timeout=WAIT_S)
    made: list[JobStore] = []
    errors: list[BaseException] = []

    def construct() -> None:
        barrier.wait()
        try:
            made.append(JobStore(*paths))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=construct) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    try:
        assert not errors and len(made) == 4
        assert made[0].counts_by_status()["queued"] == 0
    finally:
        for s in made:
            s.close()


def test_newer_schema_is_refused(store: JobStore, open_store: Callable[..., JobStore], paths: Paths) -> None:
    store.close()
    if isinstance(paths[0], Path):
        raw_sql(paths[0], "PRAGMA user_version = 99")
    else:
        raw_sql(paths[0], "UPDATE schema_version SET version = 99")
    with pytest.raises(JobStoreError, match="schema version 99"):
        open_store()


def test_closed_store_refuses_calls(store: JobStore) -> None:
    store.close()
    with pytest.raises(JobStoreError, match="closed"):
        store.list_tasks()


def test_readers_do_not_wait_for_a_writer(open_store: Callable[..., JobStore], paths: Paths) -> None:
    reader = open_store(busy_timeout_s=0.2)
    task_id = submit(reader, ["r"]).record.task_id
    with contextlib.ExitStack() as stack:
        # Another process in the middle of a long write transaction that holds what mark_failed needs.
        if isinstance(paths[0], Path):
            blocker = stack.enter_context(contextlib.closing(sqlite3.connect(paths[0], isolation_level=None)))
            blocker.execute("BEGIN IMMEDIATE")
        else:
            import psycopg

            pg = stack.enter_context(psycopg.connect(paths[0]))  # not autocommit: a transaction stays open
            pg.execute("SELECT 1 FROM tasks WHERE task_id = %s FOR UPDATE", (task_id,))
        assert reader.get(task_id).status == "queued"  # WAL / MVCC: reads go on
        with pytest.raises(JobStoreError, match="locked"):  # writes wait busy_timeout_s, then say so
            reader.mark_failed(task_id, "x")
    reader.mark_failed(task_id, "x")


# -- admission: labels and queue bound -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "conflicts"), [("queued", True), ("training", True), ("ready", True), ("failed", False)]
)
def test_labels_of_live_tasks_conflict_and_failed_ones_are_free(
    store: JobStore, paths: Paths, status: str, conflicts: bool
) -> None:
    first = submit(store, ["a", "b"]).record.task_id
    run_to(store, first, status)
    entries = upload_entries(paths[1])

    if conflicts:
        with pytest.raises(LabelConflict) as info:
            submit(store, ["c", "b", "a", "c"])
        assert info.value.labels == ["a", "b"]
        assert "['a', 'b']" in str(info.value)
        assert len(store.list_tasks()) == 1 and upload_entries(paths[1]) == entries
        assert store.known_labels() == {"a", "b"}
    else:
        assert store.known_labels() == set()
        assert submit(store, ["a", "b"]).record.classes == ["a", "b"]


def test_queue_bound_and_retry_after_estimate(store: JobStore, clock: FakeClock, paths: Paths) -> None:
    ids = [submit(store, [label], max_queued=2).record.task_id for label in ("a", "b")]
    with pytest.raises(QueueFull) as info:
        submit(store, ["c"], max_queued=2)
    assert info.value.retry_after_s == DEFAULT_RETRY_AFTER_S  # no training history yet
    assert upload_entries(paths[1]) == set(ids)

    assert store.claim_next("w") is not None
    with pytest.raises(QueueFull):  # a training task still takes a slot
        submit(store, ["c"], max_queued=2)
    clock.advance(120)
    store.mark_ready(ids[0], index=0, model_version=1, metrics={"train_accuracy": 1.0})
    third = submit(store, ["c"], max_queued=2)
    assert third.position == 1

    with pytest.raises(QueueFull) as info:
        submit(store, ["d"], max_queued=2)
    assert info.value.retry_after_s == pytest.approx(120.0)  # mean duration of recent trainings


def test_failed_submit_leaves_no_files_and_no_row(
    store: JobStore, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_publish(staging: Path, final: Path) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(jobs, "publish_staged", broken_publish)
    with pytest.raises(OSError, match="disk on fire"):
        submit(store, ["a"])
    assert store.list_tasks() == [] and upload_entries(paths[1]) == set()
    with pytest.raises(ValueError, match="one label per image"):
        store.submit(images_for(["a"]), ["a", "b"], name=None, idempotency_key=None, max_queued=1)


# -- worker side -----------------------------------------------------------------------------------------------


def test_claims_follow_submission_order_one_at_a_time(store: JobStore, clock: FakeClock) -> None:
    ids = [submit(store, [label]).record.task_id for label in ("a", "b", "c")]

    first = store.claim_next("w1")
    assert first is not None and first.task_id == ids[0]
    assert (first.status, first.attempts, first.owner, first.started_at) == ("training", 1, "w1", first.created_at)
    assert store.claim_next("w2") is None  # only one task trains at a time
    assert submit(store, ["d"]).position == 3

    progress = {"epoch": 1, "epochs": 3, "step": 4, "steps": 12, "loss": 0.5, "stage": "train"}
    store.update_progress(ids[0], progress, owner="w1")
    assert store.get(ids[0]).to_public()["progress"] == progress
    clock.advance(5)
    store.mark_ready(ids[0], index=0, model_version=7, metrics={"train_accuracy": 0.9}, owner="w1")
    done = store.get(ids[0])
    assert (done.status, done.index, done.model_version, done.metrics) == ("ready", 0, 7, {"train_accuracy": 0.9})
    assert done.finished_at == "2026-01-01T00:00:05.000Z"

    second = store.claim_next("w1")
    assert second is not None and second.task_id == ids[1]
    store.mark_failed(ids[1], "loss diverged")
    assert store.get(ids[1]).error == "loss diverged"
    third = store.claim_next("w1")
    assert third is not None and third.task_id == ids[2]
    assert store.counts_by_status() == {"queued": 1, "training": 1, "ready": 1, "failed": 1}


def test_claim_with_lease_requires_holding_it(store: JobStore, clock: FakeClock) -> None:
    submit(store, ["a"])
    assert store.claim_next("w1", lease="lineage") is None
    assert store.acquire_lease("lineage", "w1", ttl_s=10)
    assert store.claim_next("w2", lease="lineage") is None
    clock.advance(11)  # expired: not held any more, even by w1
    assert store.claim_next("w1", lease="lineage") is None
    assert store.acquire_lease("lineage", "w1", ttl_s=10)
    claimed = store.claim_next("w1", lease="lineage")
    assert claimed is not None and claimed.owner == "w1"


def test_recover_interrupted_requeues_in_order_after_a_crash(
    store: JobStore, open_store: Callable[..., JobStore]
) -> None:
    ids = [submit(store, [label]).record.task_id for label in ("a", "b")]
    assert store.claim_next("dead-worker") is not None
    store.update_progress(ids[0], {"epoch": 2})
    store.close()  # the trainer dies: the task stays "training"

    worker = open_store()
    assert worker.claim_next("w2") is None  # blocked until recovery
    assert worker.recover_interrupted() == [ids[0]]
    back = worker.get(ids[0])
    assert (back.status, back.progress, back.started_at, back.attempts) == ("queued", None, None, 1)
    assert worker.known_labels() == {"a", "b"}
    again = worker.claim_next("w2")
    assert again is not None and (again.task_id, again.attempts, again.owner) == (ids[0], 2, "w2")
    with pytest.raises(InvalidTransition, match="dead-worker"):  # fenced: the old owner can no longer report
        worker.update_progress(ids[0], {"epoch": 3}, owner="dead-worker")

    # A task that keeps killing its trainer is failed after max_attempts, so the queue moves on.
    assert worker.recover_interrupted(max_attempts=2) == []
    poisoned = worker.get(ids[0])
    assert poisoned.status == "failed" and "2 times" in (poisoned.error or "")
    assert worker.known_labels() == {"b"}
    nxt = worker.claim_next("w2")
    assert nxt is not None and nxt.task_id == ids[1]


Action = Callable[[JobStore, str], object]
TRANSITIONS: list[tuple[str, str, Action]] = [
    ("queued", "ready", lambda s, t: s.mark_ready(t, index=0, model_version=1, metrics={})),
    ("queued", "progress", lambda s, t: s.update_progress(t, {"epoch": 1})),
    ("ready", "ready", lambda s, t: s.mark_ready(t, index=1, model_version=2, metrics={})),
    ("ready", "failed", lambda s, t: s.mark_failed(t, "x")),
    ("ready", "progress", lambda s, t: s.update_progress(t, {})),
    ("failed", "failed", lambda s, t: s.mark_failed(t, "x")),
    ("failed", "ready", lambda s, t: s.mark_ready(t, index=0, model_version=1, metrics={})),
    ("training", "ready, other owner", lambda s, t: s.mark_ready(t, index=0, model_version=1, metrics={}, owner="x")),
    ("training", "failed, other owner", lambda s, t: s.mark_failed(t, "x", owner="x")),
    ("queued", "delete upload", lambda s, t: s.delete_upload(t)),
    ("training", "delete upload", lambda s, t: s.delete_upload(t)),
]  # fmt: skip


@pytest.mark.parametrize(("status", "what", "action"), TRANSITIONS, ids=[f"{s}->{w}" for s, w, _ in TRANSITIONS])
def test_invalid_transitions_raise_and_change_nothing(store: JobStore, status: str, what: str, action: Action) -> None:
    task_id = submit(store, ["a"]).record.task_id
    run_to(store, task_id, status)
    before = store.get(task_id)
    with pytest.raises(InvalidTransition, match=task_id):
        action(store, task_id)
    assert store.get(task_id) == before


def test_unknown_task_and_duplicate_index(store: JobStore) -> None:
    for call in (
        lambda: store.get("t-000000000000"),
        lambda: store.mark_failed("t-000000000000", "x"),
        lambda: store.load_upload("../../etc"),
        lambda: store.delete_upload("t-../../x"),
    ):
        with pytest.raises(TaskNotFound):
            call()
    first, second = (submit(store, [label]).record.task_id for label in ("a", "b"))
    run_to(store, first, "ready")  # index 0
    assert store.claim_next("w") is not None
    with pytest.raises(InvalidTransition, match="index 0 already belongs"):
        store.mark_ready(second, index=0, model_version=2, metrics={})


def test_leases_single_holder_expiry_and_renewal(store: JobStore, clock: FakeClock) -> None:
    assert store.lease_holder("L") is None
    assert store.acquire_lease("L", "a", ttl_s=10)
    assert not store.acquire_lease("L", "b", ttl_s=10)
    assert store.acquire_lease("L", "a", ttl_s=10)  # re-entrant for its owner
    assert store.lease_holder("L") == "a"
    assert store.renew_lease("L", "a", ttl_s=10) and not store.renew_lease("L", "b", ttl_s=10)

    clock.advance(10.5)
    assert store.lease_holder("L") is None
    assert store.renew_lease("L", "a", ttl_s=10)  # expired but untaken: nobody else can have acted
    clock.advance(10.5)
    assert store.acquire_lease("L", "b", ttl_s=10)  # expired: b takes over
    assert store.lease_holder("L") == "b"
    assert not store.renew_lease("L", "a", ttl_s=10)  # a lost it and must stop
    store.release_lease("L", "a")  # not a's to release
    assert store.lease_holder("L") == "b"
    store.release_lease("L", "b")
    assert store.lease_holder("L") is None and not store.renew_lease("L", "b", ttl_s=10)
    assert store.acquire_lease("other", "a", ttl_s=1) and store.acquire_lease("L", "a", ttl_s=1)
    with pytest.raises(ValueError, match="positive"):
        store.acquire_lease("L", "a", ttl_s=0)


# -- races between processes (each store has connections of its own, like another process) ---------------------


def race(n: int, action: Callable[[int], Any]) -> list[Any]:
    """Run ``action(i)`` for i < n on n threads released together; their results (or exceptions) by i."""
    barrier = threading.Barrier(n, timeout=WAIT_S)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = action(i)
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    return results


def test_concurrent_submits_of_one_label_one_wins(
    backend: str, open_store: Callable[..., JobStore], paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both submits pass every check before either writes a row. Under PostgreSQL they meet inside their
    # transactions, after the label check (new_task_id comes next), so only the unique index can decide; under
    # SQLite they meet after staging, and the re-check under the write lock decides.
    barrier = threading.Barrier(2, timeout=WAIT_S)
    lost = []
    if backend == "postgresql":
        real_new_id = jobs.new_task_id

        def meet_then_new_id(*args: Any) -> str:
            barrier.wait()
            return real_new_id(*args)

        monkeypatch.setattr(jobs, "new_task_id", meet_then_new_id)
        real_lost = JobStore._lost_race

        def spy(self: JobStore, *args: Any) -> SubmitResult:
            lost.append(args[0])
            return real_lost(self, *args)

        monkeypatch.setattr(JobStore, "_lost_race", spy)
    else:
        real_stage = jobs_uploads.stage_upload

        def stage_then_meet(*args: Any) -> Path:
            staged = real_stage(*args)
            barrier.wait()
            return staged

        monkeypatch.setattr(jobs, "stage_upload", stage_then_meet)
    stores = [open_store(), open_store()]
    requests = [["b", "a", "c"], ["a", "b", "d"]]  # labels in another order: neither deadlocks
    results = race(2, lambda i: submit(stores[i], requests[i]))

    winners = [r for r in results if isinstance(r, SubmitResult)]
    losers = [r for r in results if isinstance(r, LabelConflict)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert losers[0].labels == ["a", "b"]
    assert [r.task_id for r in stores[0].list_tasks()] == [winners[0].record.task_id]
    assert upload_entries(paths[1]) == {winners[0].record.task_id}  # the loser's upload is gone
    if backend == "postgresql":
        assert len(lost) == 1 and type(lost[0]).__name__ == "UniqueViolation"  # the constraint decided


@pytest.mark.parametrize("expired", [False, True], ids=["fresh lease", "expired lease"])
def test_workers_racing_for_one_lease_exactly_one_holds_it(
    open_store: Callable[..., JobStore], clock: FakeClock, expired: bool
) -> None:
    stores = [open_store(), open_store()]
    for round_ in range(8):
        name = f"lineage-{round_}"
        if expired:  # a dead holder's lease, expired: both try to take it over
            assert stores[0].acquire_lease(name, "dead", ttl_s=5)
            clock.advance(6)
        got = race(2, lambda i, name=name: stores[i].acquire_lease(name, f"w{i}", ttl_s=30))
        assert sorted(got) == [False, True], got
        winner = f"w{got.index(True)}"
        assert stores[0].lease_holder(name) == stores[1].lease_holder(name) == winner
        assert not stores[1 - got.index(True)].renew_lease(name, f"w{1 - got.index(True)}", ttl_s=30)


def test_concurrent_claims_take_one_task(open_store: Callable[..., JobStore]) -> None:
    stores = [open_store(), open_store(), open_store()]
    ids = [submit(stores[0], [label]).record.task_id for label in ("a", "b")]
    claimed = race(3, lambda i: stores[i].claim_next(f"w{i}"))
    got = [c for c in claimed if c is not None]
    assert len(got) == 1 and got[0].task_id == ids[0], claimed  # one at a time, the oldest first
    assert stores[0].counts_by_status() == {"queued": 1, "training": 1, "ready": 0, "failed": 0}


def test_lease_expiry_lets_another_worker_take_over_the_task(
    open_store: Callable[..., JobStore], clock: FakeClock
) -> None:
    a, b = open_store(), open_store()
    task_id = submit(a, ["a"]).record.task_id
    assert a.acquire_lease("lineage", "wa", ttl_s=10)
    assert not b.acquire_lease("lineage", "wb", ttl_s=10)
    assert a.claim_next("wa", lease="lineage") is not None
    clock.advance(11)  # wa stops renewing (hung, or on a host that lost its network)

    assert b.acquire_lease("lineage", "wb", ttl_s=10)
    assert b.recover_interrupted() == [task_id]
    again = b.claim_next("wb", lease="lineage")
    assert again is not None and (again.task_id, again.owner, again.attempts) == (task_id, "wb", 2)
    assert not a.renew_lease("lineage", "wa", ttl_s=10)  # wa finds out it lost the lineage...
    with pytest.raises(InvalidTransition, match="wb"):  # ...and cannot overwrite what wb does
        a.mark_ready(task_id, index=0, model_version=1, metrics={}, owner="wa")
    assert a.claim_next("wa", lease="lineage") is None
    b.mark_ready(task_id, index=0, model_version=1, metrics={}, owner="wb")
    assert a.get(task_id).status == "ready"


def test_queue_order_is_submission_order_under_concurrent_submits(open_store: Callable[..., JobStore]) -> None:
    stores = [open_store() for _ in range(4)]
    race(4, lambda i: [submit(stores[i], [f"s{i}-{k}"]) for k in range(4)])
    listed = stores[0].list_tasks()
    assert len(listed) == 16 and [r.seq for r in listed] == sorted({r.seq for r in listed})
    claimed = []
    for n in range(16):
        job = stores[n % 4].claim_next("w")
        assert job is not None
        claimed.append(job.task_id)
        stores[n % 4].mark_ready(job.task_id, index=n, model_version=n + 1, metrics={})
    assert claimed == [r.task_id for r in listed]
    assert stores[0].claim_next("w") is None


# -- upload files ----------------------------------------------------------------------------------------------


def test_corrupt_or_missing_upload_files_are_detected(store: JobStore, paths: Paths) -> None:
    task_id = submit(store, ["a", "b", "c"]).record.task_id
    image = paths[1] / task_id / "images" / "000001.bin"
    data = bytearray(image.read_bytes())
    data[10] ^= 0xFF
    image.write_bytes(bytes(data))
    with pytest.raises(UploadCorrupt, match="000001.bin") as info:
        store.load_upload(task_id)
    assert info.value.file == "images/000001.bin" and "sha256" in str(info.value)

    image.unlink()
    with pytest.raises(UploadCorrupt, match="000001.bin"):
        store.load_upload(task_id)
    (paths[1] / task_id / "upload.json").write_text("{not json")
    with pytest.raises(UploadCorrupt, match="upload.json"):
        store.load_upload(task_id)


def test_delete_upload_and_sweep(store: JobStore, paths: Paths) -> None:
    uploads = paths[1]
    task_id = submit(store, ["a"]).record.task_id
    run_to(store, task_id, "ready")
    store.delete_upload(task_id)
    assert upload_entries(uploads) == set()
    with pytest.raises(UploadCorrupt):
        store.load_upload(task_id)

    kept = submit(store, ["b"]).record.task_id
    (uploads / ".staging-deadbeef" / "images").mkdir(parents=True)  # a crashed submit before its rename
    (uploads / "t-0123456789ab" / "images").mkdir(parents=True)  # a crash between rename and commit
    assert store.list_tasks()[-1].task_id == kept and len(store.list_tasks()) == 2  # neither is a task
    assert store.sweep_staging(older_than_s=3600) == 1  # the orphan; the staging dir is too fresh
    assert upload_entries(uploads) == {kept, ".staging-deadbeef"}
    assert store.sweep_staging(older_than_s=0) == 1
    assert upload_entries(uploads) == {kept}
    assert store.load_upload(kept)[1] == ["b"]


# The child submits in a loop and prints each task id once submit() has returned. With a kill point k, it SIGKILLs
# itself right after its k-th fsync of the sixth submit (per submit: 4 image files, images/, upload.json, the
# staging dir, then the uploads dir after the rename), or with k=-1 right after the sixth submit returned but before
# printing. With k=0 it loops on until the parent SIGKILLs it.
_CHILD = """
import os, signal, sys
from pathlib import Path
from service.jobs import JobStore

store = JobStore(sys.argv[1], Path(sys.argv[2]))
kill_at, armed, fsyncs = int(sys.argv[3]), False, 0
real_fsync = os.fsync

def fsync(fd):
    global fsyncs
    real_fsync(fd)
    fsyncs += armed
    if armed and fsyncs == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

os.fsync = fsync
for i in range(400):
    armed = kill_at != 0 and i == 5
    labels = [f"c{i}-0", f"c{i}-1"] * 2
    images = [(f"{k}.png", bytes([i % 251, k]) * 16384) for k in range(len(labels))]
    record = store.submit(images, labels, name=f"n{i}", idempotency_key=None, max_queued=1000).record
    if armed and kill_at == -1:
        os.kill(os.getpid(), signal.SIGKILL)
    print(record.task_id, i, flush=True)
"""
CRASH_POINTS = {
    0: "parent kills mid-loop",
    1: "first image written",
    5: "images dir synced",
    7: "staging complete",
    8: "renamed, not committed",
    -1: "committed, not acknowledged",
}


@pytest.mark.parametrize("kill_at", list(CRASH_POINTS), ids=list(CRASH_POINTS.values()))
def test_sigkill_during_submits_loses_no_acknowledged_task(paths: Paths, kill_at: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-c", _CHILD, str(paths[0]), str(paths[1]), str(kill_at)]
    child = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stderr is not None
    acknowledged: dict[str, int] = {}
    try:
        while kill_at == 0 and len(acknowledged) < 5:
            line = child.stdout.readline()
            assert line, f"child died early: {child.stderr.read()}"
            task_id, i = line.split()
            acknowledged[task_id] = int(i)
    finally:
        if kill_at == 0:
            os.kill(child.pid, signal.SIGKILL)  # mid-way through one of the next submits
        rest, errors = child.communicate(timeout=WAIT_S)
    assert child.returncode == -signal.SIGKILL, errors
    for line in rest.splitlines(keepends=True):
        if line.endswith("\n"):  # printed, so acknowledged, before the kill
            task_id, i = line.split()
            acknowledged[task_id] = int(i)

    store = JobStore(*paths)
    try:
        records = store.list_tasks()
        visible = {r.task_id for r in records}
        assert set(acknowledged) <= visible
        if kill_at == 0:
            assert len(visible) <= len(acknowledged) + 1  # the submit in flight may have committed
        else:
            assert len(acknowledged) == 5
            assert len(visible) == 5 + (kill_at == -1)
        for r in records:  # every visible task has its complete upload
            n = int((r.name or "")[1:])
            images, labels = store.load_upload(r.task_id)
            assert labels == [f"c{n}-0", f"c{n}-1"] * 2
            assert images == [bytes([n % 251, k]) * 16384 for k in range(4)]
        leftovers = upload_entries(paths[1]) - visible
        if kill_at in (1, 5, 7):
            assert len(leftovers) == 1 and leftovers.pop().startswith(".staging-")
        elif kill_at == 8:
            assert len(leftovers) == 1 and leftovers.pop().startswith("t-")
        store.sweep_staging(older_than_s=0)
        assert upload_entries(paths[1]) == visible
    finally:
        store.close()


def test_a_version_1_database_is_migrated_and_its_keys_still_answer(paths: Paths) -> None:
    db, uploads = paths
    legacy = (
        "INSERT INTO tasks (task_id, name, status, classes, num_images, created_at, idempotency_key)"
        " VALUES ('t-0123456789ab', NULL, 'queued', '[\"old\"]', 2, '2026-01-01T00:00:00.000Z', 'legacy')"
    )
    if isinstance(db, Path):
        db.parent.mkdir(parents=True, exist_ok=True)
        raw_sql(db, *jobs_db._MIGRATIONS[0], "PRAGMA user_version = 1", legacy)
    else:
        from service.jobs import postgres as jobs_pg

        version = "CREATE TABLE schema_version (one BOOLEAN PRIMARY KEY DEFAULT TRUE, version INTEGER NOT NULL)"
        raw_sql(db, *jobs_pg._MIGRATIONS[0], version, "INSERT INTO schema_version (version) VALUES (1)", legacy)
    store = JobStore(db, uploads)
    try:
        old = store.get("t-0123456789ab")
        assert old.request_hash is None
        # Stored before request hashes existed: the key alone decides, as it did then.
        assert submit(store, ["new"], key="legacy").record.task_id == old.task_id
    finally:
        store.close()
    query = "PRAGMA user_version" if isinstance(db, Path) else "SELECT version FROM schema_version"
    assert raw_sql(db, query)[0][0] == SCHEMA_VERSION == 2
