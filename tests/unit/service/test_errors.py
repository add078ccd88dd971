"""The error table of service/errors.py: what clients see for each code, and the job store's errors through it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.errors import ERRORS, ApiError, api_error, install_error_handlers
from service.jobs import (
    IdempotencyKeyReused,
    InvalidTransition,
    JobStoreError,
    LabelConflict,
    QueueFull,
    TaskNotFound,
    UploadCorrupt,
)

API_MD = Path(__file__).resolve().parents[3] / "docs" / "api.md"


def answer(error: ApiError) -> tuple[int, str, str, dict[str, Any], dict[str, str]]:
    return error.status, error.code, error.message, error.details, error.headers


# What clients saw before the table existed, written out: a change of wording, status or header fails here.
@pytest.mark.parametrize(
    ("code", "fields", "expected"),
    [
        (
            "unauthorized",
            {"what": "API key", "how": "send 'X-API-Key: <key>'"},
            (401, "API key required: send 'X-API-Key: <key>'", {}, {"WWW-Authenticate": "Bearer"}),
        ),
        ("forbidden", {"what": "admin token"}, (403, "the admin token is not valid for this server", {}, {})),
        (
            "task_not_found",
            {"task_id": "t-1"},
            (404, "no task 't-1'; GET /tasks lists the known tasks", {"task_id": "t-1"}, {}),
        ),
        (
            "label_exists",
            {"labels": [f"l{i:02}" for i in range(12)]},
            (
                409,
                "12 label(s) are already learned or queued: l00, l01, l02, l03, l04, l05, l06, l07, l08, l09; "
                "class-incremental learning needs new labels (rename them, e.g. 'cat-2')",
                {"labels": [f"l{i:02}" for i in range(12)]},
                {},
            ),
        ),
        (
            "idempotency_key_reused",
            {"task_id": "t-2", "key": "k"},
            (
                422,
                "the Idempotency-Key was first used for task t-2 with different images, labels or name; retry with "
                "exactly the same request, or send a new key for a new task",
                {"task_id": "t-2"},
                {},
            ),
        ),
        (
            "queue_full",
            {"max_queued": 100, "pending": 100, "retry_after_s": 41.6},
            (429, "100 tasks are already waiting to be trained; retry later", {}, {"Retry-After": "42"}),
        ),
        (
            "overloaded",
            {"queued_images": 256, "retry_after_s": 0.3},
            (
                429,
                "256 images are waiting for inference; retry after 1 s or send fewer images",
                {"queued_images": 256},
                {"Retry-After": "1"},
            ),
        ),
        ("not_ready", {}, (503, "the model is still loading", {}, {"Retry-After": "2"})),
        (
            "registry_unreadable",
            {"reason": OSError("disk gone")},
            (503, "the registry cannot be read: disk gone", {}, {"Retry-After": "5"}),
        ),
        (
            "no_classes",
            {},
            (503, "nothing has been learned yet: POST labelled images to /tasks first", {}, {"Retry-After": "5"}),
        ),
        ("shutting_down", {}, (503, "the server is shutting down; retry", {}, {"Retry-After": "1"})),
        (
            "internal_error",
            {"request_id": "abc"},
            (500, "internal error; quote request id abc when reporting it", {}, {}),
        ),
    ],
)
def test_each_code_answers_as_before(code: str, fields: dict[str, Any], expected: tuple[Any, ...]) -> None:
    status, message, details, headers = expected
    assert answer(api_error(code, **fields)) == (status, code, message, details, headers)


def test_every_code_of_the_table_is_documented() -> None:
    documented = set(re.findall(r"`([a-z_]+)`", API_MD.read_text()))
    assert set(ERRORS) - documented == set()


def test_every_client_error_of_the_job_store_has_a_row() -> None:
    coded = {cls: cls.code for cls in (TaskNotFound, LabelConflict, IdempotencyKeyReused, QueueFull)}
    assert all(code in ERRORS for code in coded.values())
    assert UploadCorrupt.code is None and InvalidTransition.code is None  # not the client's doing: 500


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app, domain_errors=(JobStoreError,))
    raised: dict[str, Exception] = {
        "missing": TaskNotFound("t-9"),
        "conflict": LabelConflict(["b", "a", "a"]),
        "reused": IdempotencyKeyReused("key", "t-3"),
        "full": QueueFull(3, 3, 0.2),
        "corrupt": UploadCorrupt("t-4", "0.png", "sha256 differs"),
    }

    @app.get("/{what}")
    async def fail(what: str) -> None:
        raise raised[what]

    return TestClient(app, raise_server_exceptions=False)


def test_the_job_stores_errors_are_answered_from_the_table(client: TestClient) -> None:
    missing = client.get("/missing")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {
            "code": "task_not_found",
            "message": "no task 't-9'; GET /tasks lists the known tasks",
            "details": {"task_id": "t-9"},
        }
    }
    conflict = client.get("/conflict")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["details"] == {"labels": ["a", "b"]}
    assert conflict.json()["error"]["message"].startswith("2 label(s) are already learned or queued: a, b; ")
    reused = client.get("/reused")
    assert (reused.status_code, reused.json()["error"]["details"]) == (422, {"task_id": "t-3"})
    full = client.get("/full")
    assert (full.status_code, full.headers["retry-after"], full.json()["error"]["code"]) == (429, "1", "queue_full")


def test_a_job_store_error_without_a_code_is_a_500(client: TestClient) -> None:
    corrupt = client.get("/corrupt")
    assert corrupt.status_code == 500
    assert corrupt.json()["error"]["code"] == "internal_error"
    assert "sha256" not in corrupt.text  # no internals in the body
