"""The error table of service/errors.py: what clients see for each code, and the job store's and the request
readers' errors through it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.errors import ERRORS, ApiError, api_error, error_response, install_error_handlers
from service.jobs import (
    IdempotencyKeyReused,
    InvalidTransition,
    JobStoreError,
    LabelConflict,
    QueueFull,
    TaskNotFound,
    UploadCorrupt,
)

ROOT = Path(__file__).resolve().parents[3]
API_MD = ROOT / "docs" / "api.md"


def answer(error: ApiError) -> tuple[int, str, str, dict[str, Any], dict[str, str]]:
    return error.status, error.code, error.message, error.details, error.headers


# What clients saw before the table existed, written out: a change of wording, status or header fails here.
# (code, fields, (status, message, details, headers)); every code of the table has a case.
CASES: list[tuple[str, dict[str, Any], tuple[int, str, dict[str, Any], dict[str, str]]]] = [
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
    (
        "validation_error",
        {"summary": "query.top_k: too big", "errors": [{"location": "query.top_k", "problem": "too big"}]},
        (422, "query.top_k: too big", {"errors": [{"location": "query.top_k", "problem": "too big"}]}, {}),
    ),
    # The request readers (service/ingest/), as they answered when they built their errors themselves.
    ("bad_request", {"message": "m1"}, (400, "m1", {}, {})),
    (
        "bad_request",
        {"message": "3 images but 2 labels {x}", "details": {"images": 3, "labels": 2}},
        (400, "3 images but 2 labels {x}", {"images": 3, "labels": 2}, {}),
    ),
    (
        "request_timeout",
        {"reason": "no part of the request body arrived for 10 s"},
        (
            408,
            "no part of the request body arrived for 10 s; send the request body without pauses",
            {},
            {"Connection": "close"},
        ),
    ),
    ("too_large", {"message": "6 images, the limit is 3 per task"}, (413, "6 images, the limit is 3 per task", {}, {})),
    (
        "too_large",
        {"message": "the archive has more than 9 entries; send fewer images", "details": {"limit": 9}},
        (413, "the archive has more than 9 entries; send fewer images", {"limit": 9}, {}),
    ),
    (
        "unsupported_media_type",
        {"content_type": "", "accepted": ["multipart/form-data", "image/*"]},
        (
            415,
            "Content-Type '(none)' is not accepted here; send one of: multipart/form-data, image/*",
            {"content_type": "", "accepted": ["multipart/form-data", "image/*"]},
            {},
        ),
    ),
    (
        "unsupported_media_type",
        {"content_type": "text/plain", "accepted": ["multipart/form-data"]},
        (
            415,
            "Content-Type 'text/plain' is not accepted here; send one of: multipart/form-data",
            {"content_type": "text/plain", "accepted": ["multipart/form-data"]},
            {},
        ),
    ),
    (
        "invalid_image",
        {
            "message": "image 'e.png' is empty (0 bytes); send a complete PNG file",
            "details": {"images": [{"name": "e.png", "reason": "is empty (0 bytes)"}]},
        },
        (
            422,
            "image 'e.png' is empty (0 bytes); send a complete PNG file",
            {"images": [{"name": "e.png", "reason": "is empty (0 bytes)"}]},
            {},
        ),
    ),
    (
        "invalid_label",
        {
            "labels": [{"label": "", "reason": "is empty"}, {"label": "a/b", "reason": "contains a path separator"}],
            "shown": "'' is empty; 'a/b' contains a path separator",
            "max_length": 64,
        },
        (
            422,
            "2 invalid label(s): '' is empty; 'a/b' contains a path separator. Fix them: labels are 1 to 64 "
            "characters, without control characters, '/', '\\' or surrounding spaces, not '.' or '..'",
            {"labels": [{"label": "", "reason": "is empty"}, {"label": "a/b", "reason": "contains a path separator"}]},
            {},
        ),
    ),
    (
        "invalid_name",
        {"name": "a\udcff\xe9.png", "problem": "is not valid UTF-8 (byte 0xFF)", "what": "file name"},
        (
            422,
            "file name 'a\\udcff\\xe9.png' is not valid UTF-8 (byte 0xFF); name files and folders in UTF-8 without "
            "non-characters",
            {"entries": ["a\\udcff\\xe9.png"], "reason": "is not valid UTF-8 (byte 0xFF)"},
            {},
        ),
    ),
    (
        "too_few_images",
        {"min_images_per_class": 2, "counts": {"a": 1, "b": 3}, "classes": ["a"], "shown": "'a' has 1"},
        (
            422,
            "every class needs at least 2 images, 1 have fewer: 'a' has 1; add images",
            {"min_images_per_class": 2, "counts": {"a": 1, "b": 3}, "classes": ["a"]},
            {},
        ),
    ),
    (
        "uploads_busy",
        {"limit_bytes": 12345, "retry_after": 5},
        (
            429,
            "the server already receives 12345 bytes of request bodies, its limit; retry in 5 s",
            {"limit_bytes": 12345},
            {"Retry-After": "5"},
        ),
    ),
]


@pytest.mark.parametrize(("code", "fields", "expected"), CASES)
def test_each_code_answers_as_before(code: str, fields: dict[str, Any], expected: tuple[Any, ...]) -> None:
    status, message, details, headers = expected
    assert answer(api_error(code, **fields)) == (status, code, message, details, headers)


@pytest.mark.parametrize(("code", "fields", "expected"), CASES)
def test_each_code_renders_its_envelope(code: str, fields: dict[str, Any], expected: tuple[Any, ...]) -> None:
    status, message, details, headers = expected
    response = error_response(api_error(code, **fields))
    assert response.status_code == status
    assert json.loads(response.body) == {"error": {"code": code, "message": message, "details": details}}
    assert {name: response.headers[name] for name in headers} == headers
    assert set(response.headers) == {"content-length", "content-type"} | {name.lower() for name in headers}


def test_every_code_of_the_table_has_a_case() -> None:
    assert {code for code, _, _ in CASES} == set(ERRORS)


def test_service_builds_errors_only_through_the_table() -> None:
    """No module but errors.py constructs an ApiError itself: every status, message and header is a row of ERRORS,
    and every code raised by name has a row."""
    sources = {path: path.read_text() for path in (ROOT / "service").rglob("*.py")}
    builders = sorted(str(path.relative_to(ROOT)) for path, text in sources.items() if "ApiError(" in text)
    assert builders == ["service/errors.py"]
    raised = {code for text in sources.values() for code in re.findall(r'api_error\(\s*"([a-z_]+)"', text)}
    assert {"bad_request", "too_large", "invalid_name", "too_few_images", "uploads_busy"} <= raised
    assert raised - set(ERRORS) == set()


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
