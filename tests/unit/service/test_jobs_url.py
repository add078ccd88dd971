"""CARE_JOBS_URL picks the job database: the SQLite file in the data directory by default, PostgreSQL when set."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.housekeeping import open_job_store
from service.jobs import JobStoreError
from service.settings import Settings
from tests.postgres import PostgresServer


def test_unset_or_empty_is_the_sqlite_file(tmp_path: Path) -> None:
    for settings in (Settings(data_dir=tmp_path), Settings(data_dir=tmp_path, jobs_url="")):
        assert settings.jobs_url is None and settings.jobs_database == tmp_path / "jobs.sqlite3"
        jobs = open_job_store(settings)
        try:
            assert jobs.database.kind == "sqlite" and (tmp_path / "jobs.sqlite3").is_file()
        finally:
            jobs.close()
        assert settings.environment()["CARE_JOBS_URL"] == ""


@pytest.mark.parametrize("url", ["sqlite:///x.db", "mysql://h/db", "/data/jobs.sqlite3", "postgresql:/x"])
def test_anything_but_a_postgresql_url_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="postgresql://"):
        Settings(jobs_url=url)


def test_a_postgresql_url_opens_the_store_there_for_server_and_worker(tmp_path: Path, postgres: PostgresServer) -> None:
    with postgres.database() as url:
        settings = Settings(data_dir=tmp_path, jobs_url=url)
        assert settings.jobs_database == url
        worker_env = settings.environment()  # what the supervisor starts the worker with
        assert worker_env["CARE_JOBS_URL"] == url
        jobs = open_job_store(settings)
        try:
            assert jobs.database.kind == "postgresql"
            task = jobs.submit([("a.png", b"x"), ("b.png", b"y")], ["a", "b"], name=None, idempotency_key=None,
                               max_queued=10).record  # fmt: skip
            assert jobs.get(task.task_id).classes == ["a", "b"]
        finally:
            jobs.close()
        assert not (tmp_path / "jobs.sqlite3").exists()  # nothing of the job store went to the data directory


def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    from service.jobs.postgres import redact

    url = "postgresql://care:hunter2@127.0.0.1:1/care"  # nothing listens on port 1
    with pytest.raises(JobStoreError, match="cannot connect to the job database") as info:
        open_job_store(Settings(data_dir=tmp_path, jobs_url=url))
    assert "hunter2" not in str(info.value) and redact(url) in str(info.value)
