"""Housekeeping on real files and a real SQLite job store: crash leftovers, uploads of ready tasks, disk usage.

Leftovers are made the way a crash leaves them (a staging directory with part of an upload, an upload directory
no row owns, a registry temp file beside its final name) and aged with ``os.utime``, since the grace period is
what protects a submit or publish in flight.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import Registry
from service.housekeeping import Housekeeper, data_dir_usage, open_job_store, sweep
from service.jobs import JobStore
from service.settings import Settings
from tests.unit.registry.helpers import publish_task

HOUR_AGO = time.time() - 3600


def _age(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        os.utime(p, (HOUR_AGO, HOUR_AGO))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", backbone="test_vit", backbone_weights="random", sweep_grace_s=600)


@pytest.fixture
def jobs(settings: Settings) -> Iterator[JobStore]:
    # Keeps uploads when it marks a task ready (as releases before housekeeping did): sweeps must catch those.
    store = JobStore(settings.jobs_db, settings.uploads_dir, keep_uploads=True)
    yield store
    store.close()


def submit(store: JobStore, labels: list[str]) -> str:
    images = [(f"{i}.png", f"{i}|{label}|".encode() * 512) for i, label in enumerate(labels)]
    return store.submit(images, labels, name=None, idempotency_key=None, max_queued=100).record.task_id


def make_ready(store: JobStore, task_id: str, index: int = 0) -> None:
    claimed = store.claim_next("w")
    assert claimed is not None and claimed.task_id == task_id
    store.mark_ready(task_id, index=index, model_version=index + 1, metrics={})


def crash_leftovers(settings: Settings) -> dict[str, Path]:
    """What a SIGKILL leaves behind: mid-submit staging, a renamed-but-uncommitted upload, a mid-publish temp file."""
    staging = settings.uploads_dir / ".staging-00112233aabbccdd"
    (staging / "images").mkdir(parents=True)
    (staging / "images" / "000000.bin").write_bytes(b"x" * 5000)
    orphan = settings.uploads_dir / "t-0123456789ab"
    (orphan / "images").mkdir(parents=True)
    (orphan / "upload.json").write_text("{}")
    temp = settings.registry_dir / "tasks" / "0002-t-x" / ".routers.safetensors.0123456789abcdef0123456789abcdef.tmp"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(b"y" * 7000)
    for path in (staging, orphan, temp):
        _age(path)
    young = settings.uploads_dir / ".staging-99887766ffeeddcc"  # a submit writing right now
    (young / "images").mkdir(parents=True)
    return {"staging": staging, "orphan": orphan, "temp": temp, "young": young}


def test_mark_ready_deletes_the_upload_unless_kept(tmp_path: Path) -> None:
    for keep in (False, True):
        store = JobStore(tmp_path / f"{keep}.sqlite3", tmp_path / f"uploads-{keep}", keep_uploads=keep)
        task_id = submit(store, ["a", "a"])
        assert (store.uploads_dir / task_id / "upload.json").is_file()
        make_ready(store, task_id)
        assert (store.uploads_dir / task_id).exists() is keep
        assert store.get(task_id).status == "ready"
        # Nothing of the deleted upload is left under a staging name either.
        assert [p.name for p in store.uploads_dir.iterdir()] == ([task_id] if keep else [])
        store.close()


def test_pending_and_failed_uploads_are_never_deleted(jobs: JobStore, settings: Settings) -> None:
    jobs.keep_uploads = False
    failed, training, queued = submit(jobs, ["f", "f"]), submit(jobs, ["t", "t"]), submit(jobs, ["q", "q"])
    assert jobs.claim_next("w") is not None
    jobs.mark_failed(failed, "boom")
    assert jobs.claim_next("w") is not None  # `training` now
    assert sweep(settings, jobs).ready_uploads == 0
    assert {p.name for p in settings.uploads_dir.iterdir()} == {failed, training, queued}


def test_sweep_removes_stale_leftovers_and_ready_uploads_only(settings: Settings, jobs: JobStore) -> None:
    Registry.from_path(settings.registry_dir)
    left = crash_leftovers(settings)
    ready, queued = submit(jobs, ["a", "a"]), submit(jobs, ["b", "b"])
    make_ready(jobs, ready)
    assert (settings.uploads_dir / ready).exists()

    result = sweep(settings, jobs)

    assert (result.staging_dirs, result.registry_temp_files, result.ready_uploads) == (2, 1, 1)
    assert not left["staging"].exists() and not left["orphan"].exists() and not left["temp"].exists()
    assert left["young"].exists(), "a staging directory younger than the grace belongs to a submit in flight"
    assert {p.name for p in settings.uploads_dir.iterdir()} == {queued, left["young"].name}
    assert jobs.load_upload(queued)[1] == ["b", "b"]


def test_keep_uploads_keeps_ready_uploads_through_sweeps(settings: Settings, tmp_path: Path) -> None:
    kept = settings.model_copy(update={"keep_uploads": True})
    store = open_job_store(kept)
    try:
        task_id = submit(store, ["a", "a"])
        make_ready(store, task_id)
        assert sweep(kept, store).ready_uploads == 0
        assert store.load_upload(task_id)[1] == ["a", "a"]
    finally:
        store.close()


def test_worker_start_up_sweep_removes_leftovers(settings: Settings) -> None:
    left = crash_leftovers(settings)
    store = open_job_store(settings)
    try:
        assert not any(left[k].exists() for k in ("staging", "orphan", "temp"))
        assert left["young"].exists()
        assert store.keep_uploads is False
    finally:
        store.close()


def test_usage_by_kind_and_the_housekeeper_gauge_moves(settings: Settings, jobs: JobStore) -> None:
    reg = Registry.from_path(settings.registry_dir)
    publish_task(reg, None, "t1")
    crash_leftovers(settings)
    usage = data_dir_usage(settings)
    registry_bytes = sum(p.stat().st_size for p in settings.registry_dir.rglob("*") if p.is_file()) - 7000
    assert usage["registry"] == registry_bytes
    assert usage["staging"] == 5000 + 7000
    assert usage["uploads"] == 2  # the orphan's "{}"
    assert usage["jobs_db"] >= 4096

    housekeeper = Housekeeper(settings, jobs, usage_max_age_s=3600)
    assert housekeeper.usage() == usage
    task_id = submit(jobs, ["a", "a"])
    assert housekeeper.usage() == usage, "cached until the next sweep or max age"
    housekeeper.sweep()
    after_submit = housekeeper.usage()
    assert after_submit["staging"] == 0 and after_submit["uploads"] > 2 * 512
    make_ready(jobs, task_id)
    housekeeper.sweep()
    assert housekeeper.usage()["uploads"] == 0
    assert housekeeper.usage()["registry"] == registry_bytes


def test_periodic_sweeps_run_on_their_interval_and_stop(settings: Settings, jobs: JobStore) -> None:
    fast = settings.model_copy(update={"sweep_interval_s": 0.05, "sweep_grace_s": 0.0})
    housekeeper = Housekeeper(fast, jobs)
    housekeeper.start()
    try:
        staging = fast.uploads_dir / ".staging-aaaaaaaaaaaaaaaa"
        staging.mkdir()
        deadline = time.monotonic() + 10
        while staging.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not staging.exists() and housekeeper.sweeps >= 1
    finally:
        housekeeper.stop()
    count = housekeeper.sweeps
    time.sleep(0.2)
    assert housekeeper.sweeps == count, "no sweep after stop()"
