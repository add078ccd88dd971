"""The job store with its uploads also in the registry's bucket (S3Uploads), against moto's S3 server on loopback.

Two JobStores on one database with separate uploads directories stand for a server and a worker on two hosts.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from service.jobs import JobStore, UploadCorrupt
from service.jobs.shared_uploads import LocalUploads
from service.jobs.store import open_upload_store

pytest.importorskip("boto3")
pytest.importorskip("moto")

from service.jobs.s3_uploads import S3Uploads

PREFIX = "care/registry"


@pytest.fixture
def uploads(s3_endpoint: str) -> S3Uploads:
    bucket = f"care-{uuid.uuid4().hex[:12]}"
    store = open_upload_store(f"s3://{bucket}/{PREFIX}", s3_endpoint)
    assert isinstance(store, S3Uploads)
    store.client.create_bucket(Bucket=bucket)
    return store


def keys(uploads: S3Uploads) -> list[str]:
    listed = uploads.client.list_objects_v2(Bucket=uploads.bucket, Prefix=f"{PREFIX}/uploads/")
    return sorted(str(item["Key"]) for item in listed.get("Contents", []))


def images(labels: list[str]) -> list[tuple[str, bytes]]:
    return [(f"img{i}.png", f"{i}|{label}|".encode() * 64) for i, label in enumerate(labels)]


def open_stores(tmp_path: Path, uploads: Any, **kwargs: Any) -> tuple[JobStore, JobStore]:
    db = tmp_path / "jobs.sqlite3"
    server = JobStore(db, tmp_path / "server-uploads", shared_uploads=uploads, **kwargs)
    worker = JobStore(db, tmp_path / "worker-uploads", shared_uploads=uploads, **kwargs)
    return server, worker


def test_the_default_stores_nothing_beyond_the_directory(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3", tmp_path / "uploads")
    assert isinstance(store.shared_uploads, LocalUploads) and not store.shared_uploads.shared
    assert isinstance(open_upload_store(None), LocalUploads)
    task_id = store.submit(
        images(["a", "b"]), ["a", "b"], name=None, idempotency_key=None, max_queued=10
    ).record.task_id
    assert store.load_upload(task_id)[1] == ["a", "b"]
    store.close()


def test_an_upload_is_in_the_bucket_before_the_task_is_queued_and_a_worker_elsewhere_reads_it(
    tmp_path: Path, uploads: S3Uploads
) -> None:
    server, worker = open_stores(tmp_path, uploads, keep_uploads=False)
    labels = ["cat", "dog", "cat"]
    task_id = server.submit(images(labels), labels, name=None, idempotency_key=None, max_queued=10).record.task_id
    root = f"{PREFIX}/uploads/{task_id}"
    assert keys(uploads) == [f"{root}/images/{i:06d}.bin" for i in range(3)] + [f"{root}/upload.json"]
    assert not (worker.uploads_dir / task_id).exists()

    claimed = worker.claim_next("w")
    assert claimed is not None and claimed.task_id == task_id
    assert worker.load_upload(task_id) == ([data for _, data in images(labels)], labels)
    assert (worker.uploads_dir / task_id / "upload.json").is_file()  # kept as this host's copy
    assert not [p for p in os.listdir(worker.uploads_dir) if p.startswith(".staging-")]

    worker.mark_ready(task_id, index=0, model_version=1, metrics={}, owner="w")
    assert keys(uploads) == []
    assert not (worker.uploads_dir / task_id).exists()
    # The server's copy goes with its next sweep, as the copies of ready tasks always did.
    assert (server.uploads_dir / task_id).exists()
    assert server.delete_ready_uploads() == 1 and not (server.uploads_dir / task_id).exists()
    server.close()
    worker.close()


def test_a_damaged_object_is_refused_and_a_missing_upload_named(tmp_path: Path, uploads: S3Uploads) -> None:
    server, worker = open_stores(tmp_path, uploads)
    task_id = server.submit(images(["a", "b"]), ["a", "b"], name=None, idempotency_key=None, max_queued=10)
    task_id = task_id.record.task_id
    key = f"{PREFIX}/uploads/{task_id}/images/000001.bin"
    uploads.client.put_object(Bucket=uploads.bucket, Key=key, Body=b"tampered", Metadata={"sha256": "0" * 64})
    with pytest.raises(UploadCorrupt, match="images/000001.bin"):
        worker.load_upload(task_id)
    assert not (worker.uploads_dir / task_id).exists()
    uploads.delete(task_id)
    with pytest.raises(UploadCorrupt, match="upload.json"):
        worker.load_upload(task_id)
    server.close()
    worker.close()


def test_refused_submits_leave_nothing_and_sweeps_delete_orphans_and_ready_uploads(
    tmp_path: Path, uploads: S3Uploads
) -> None:
    server, worker = open_stores(tmp_path, uploads)
    first = server.submit(images(["a", "b"]), ["a", "b"], name=None, idempotency_key="k", max_queued=10)
    before = keys(uploads)
    again = server.submit(images(["a", "b"]), ["a", "b"], name=None, idempotency_key="k", max_queued=10)
    assert not again.created and keys(uploads) == before  # an idempotent retry writes nothing

    class Refusing(S3Uploads):
        def put(self, task_id: str, task_dir: Path) -> None:
            super().put(task_id, task_dir)
            raise ConnectionError("the store went away")

    broken = JobStore(
        tmp_path / "jobs.sqlite3", tmp_path / "broken", shared_uploads=Refusing(uploads.client, uploads.bucket, PREFIX)
    )
    with pytest.raises(ConnectionError):
        broken.submit(images(["c", "d"]), ["c", "d"], name=None, idempotency_key=None, max_queued=10)
    assert keys(uploads) == before  # the half-put upload was deleted; no row names it
    assert [t.task_id for t in server.list_tasks()] == [first.record.task_id]
    broken.close()

    # An orphan (a server that died between its put and its commit) goes once older than the grace.
    orphan = "t-0123456789ab"
    (tmp_path / "orphan" / "images").mkdir(parents=True)
    (tmp_path / "orphan" / "images" / "000000.bin").write_bytes(b"x")
    (tmp_path / "orphan" / "upload.json").write_bytes(b"{}")
    uploads.put(orphan, tmp_path / "orphan")
    assert server.sweep_staging(older_than_s=3600) == 0 and orphan in uploads.stored()
    assert server.sweep_staging(older_than_s=-60) == 1 and set(uploads.stored()) == {first.record.task_id}

    # Ready (with keep_uploads, mark_ready keeps them): the ready sweep deletes them from the bucket.
    task_id = first.record.task_id
    assert worker.claim_next("w") is not None
    worker.mark_ready(task_id, index=0, model_version=1, metrics={}, owner="w")
    assert set(uploads.stored()) == {task_id}
    assert worker.delete_ready_uploads() == 1
    assert keys(uploads) == []
    server.close()
    worker.close()
