"""Every bad input gets its documented 4xx in the error envelope, and the server stays healthy and loses nothing."""

from __future__ import annotations

import io
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.settings import Settings
from service.training.worker import TrainingWorker
from tests.integration.conftest import png, task_files, updated, wait_for, wait_ready
from tests.unit.service.test_uploads import gnu_tar

GOOD = png((10, 200, 10))


def huge_png() -> bytes:
    """A 7000 x 7000 1-bit PNG: a few kB on the wire, 49 M pixels once decoded (over the 40 M default cap)."""
    buffer = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(images: list[tuple[str, bytes]], labels: list[str]) -> dict[str, Any]:
    return {
        "files": [("images", (name, data, "image/png")) for name, data in images],
        "data": {"labels": labels},
    }


TASK_CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    "truncated image": (
        multipart([("a.png", GOOD), ("b.png", GOOD[: len(GOOD) // 2])], ["a", "a"]),
        422,
        "invalid_image",
    ),
    "non-image bytes": (
        multipart([("a.png", GOOD), ("b.png", b"this is not an image")], ["a", "a"]),
        422,
        "invalid_image",
    ),
    "zero-byte file": (multipart([("a.png", GOOD), ("b.png", b"")], ["a", "a"]), 422, "invalid_image"),
    "labels/images mismatch": (multipart([("a.png", GOOD), ("b.png", GOOD)], ["a"]), 400, "bad_request"),
    "existing label": (multipart([("a.png", GOOD), ("b.png", GOOD)], ["known", "known"]), 409, "label_exists"),
    "label with a path separator": (
        multipart([("a.png", GOOD), ("b.png", GOOD)], ["cat/dog", "cat/dog"]),
        422,
        "invalid_label",
    ),
    "oversized image": (multipart([("a.png", GOOD), ("b.png", huge_png())], ["a", "a"]), 413, "too_large"),
    "wrong content type": (
        {"content": b"{}", "headers": {"content-type": "application/json"}},
        415,
        "unsupported_media_type",
    ),
    "empty upload": ({"files": [("name", (None, "nothing"))]}, 400, "bad_request"),
    "too few images per class": (multipart([("a.png", GOOD)], ["lonely"]), 422, "too_few_images"),
}

PREDICT_CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    "truncated image": ({"content": GOOD[:20], "headers": {"content-type": "image/png"}}, 422, "invalid_image"),
    "non-image bytes": ({"content": b"nope", "headers": {"content-type": "image/png"}}, 422, "invalid_image"),
    "zero-byte file": ({"content": b"", "headers": {"content-type": "image/png"}}, 422, "invalid_image"),
    "oversized image": ({"content": huge_png(), "headers": {"content-type": "image/png"}}, 413, "too_large"),
    "wrong content type": ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    "empty multipart": ({"files": [("other", (None, "x"))]}, 400, "bad_request"),
}


@pytest.fixture
def trained(client: TestClient, worker: TrainingWorker) -> tuple[TestClient, str]:
    files, labels = task_files(["known", "other"])
    task_id = client.post("/tasks", files=files, data={"labels": labels}).json()["task_id"]
    assert wait_ready(client, task_id)["status"] == "ready"
    wait_for(lambda: client.get("/model").json()["model_version"] == 1)
    return client, task_id


def check_envelope(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and len(error["message"]) > 10 and isinstance(error["details"], dict)


def test_bad_task_uploads(trained: tuple[TestClient, str]) -> None:
    client, task_id = trained
    for name, (request, status, code) in TASK_CASES.items():
        response = client.post("/tasks", **request)
        try:
            check_envelope(response, status, code)
        except AssertionError as error:
            raise AssertionError(f"case {name!r}: {error}") from error
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    # Nothing accepted was lost, nothing rejected was stored.
    assert [t["task_id"] for t in client.get("/tasks").json()] == [task_id]
    assert client.post("/predict", content=GOOD, headers={"content-type": "image/png"}).status_code == 200


def test_bad_predict_requests(trained: tuple[TestClient, str]) -> None:
    client, _ = trained
    for name, (request, status, code) in PREDICT_CASES.items():
        response = client.post("/predict", **request)
        try:
            check_envelope(response, status, code)
        except AssertionError as error:
            raise AssertionError(f"case {name!r}: {error}") from error
    for top_k in (0, 101, "x"):
        response = client.post(f"/predict?top_k={top_k}", content=GOOD, headers={"content-type": "image/png"})
        check_envelope(response, 422, "validation_error")
    assert client.get("/tasks/t-000000000000").status_code == 404
    check_envelope(client.get("/tasks/t-000000000000"), 404, "task_not_found")
    assert client.post("/predict", content=GOOD, headers={"content-type": "image/png"}).status_code == 200


def test_too_many_predict_images_and_body_limits(
    trained: tuple[TestClient, str], settings: Settings, client_factory: Any
) -> None:
    # A second server on the same data dir with tight limits: it serves the version the first one trained.
    client = client_factory(updated(settings, max_predict_images=2, max_upload_bytes=5000))
    assert client.get("/model").json()["model_version"] == 1
    files = [("images", (f"{i}.png", GOOD, "image/png")) for i in range(3)]
    check_envelope(client.post("/predict", files=files), 413, "too_large")
    assert client.post("/predict", files=files[:2]).status_code == 200
    files, labels = task_files(["big1", "big2"], per_class=40)
    check_envelope(client.post("/tasks", files=files, data={"labels": labels}), 413, "too_large")


HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "lone surrogate in a JSON label list": (
        {**multipart([("a.png", GOOD), ("b.png", GOOD)], []), "data": {"labels": '["x\\udcff", "x\\udcff"]'}},
        "invalid_label",
    ),
    "latin-1 tar entry name": (
        {
            "content": gnu_tar({"caf\udce9/0.png": GOOD, "caf\udce9/1.png": GOOD}),
            "headers": {"content-type": "application/x-tar"},
        },
        "invalid_name",
    ),
    "file name byte 0xff in a valid label folder": (
        {
            "content": gnu_tar({"cat/0.png": GOOD, "cat/\udcff.png": GOOD}),
            "headers": {"content-type": "application/x-tar"},
        },
        "invalid_name",
    ),
    "non-character label": (multipart([("a.png", GOOD), ("b.png", GOOD)], ["x\ufffe", "x\ufffe"]), "invalid_label"),
}


def test_hostile_names_are_422_and_leave_nothing_behind(client: TestClient, settings: Settings) -> None:
    for name, (request, code) in HOSTILE.items():
        response = client.post("/tasks", **request)
        try:
            check_envelope(response, 422, code)
            response.content.decode("utf-8")  # strict: the envelope itself is valid UTF-8
        except AssertionError as error:
            raise AssertionError(f"case {name!r}: {error}") from error
    assert client.get("/tasks").json() == []
    assert [p.name for p in settings.uploads_dir.iterdir()] == []


def test_precomposed_and_decomposed_labels_are_one_class(client: TestClient) -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    first = client.post("/tasks", **multipart([("a.png", GOOD), ("b.png", GOOD)], [composed, decomposed]))
    assert first.status_code == 202, first.text
    assert first.json()["classes"] == [composed]
    again = client.post("/tasks", **multipart([("a.png", GOOD), ("b.png", GOOD)], [decomposed, decomposed]))
    check_envelope(again, 409, "label_exists")
    assert again.json()["error"]["details"]["labels"] == [composed]


def test_a_bad_predict_request_gets_its_4xx_before_the_no_classes_answer(client: TestClient) -> None:
    assert client.get("/model").json()["model_version"] is None  # nothing learned: a good request is 503
    for name, (request, status, code) in PREDICT_CASES.items():
        response = client.post("/predict", **request)
        try:
            check_envelope(response, status, code)
        except AssertionError as error:
            raise AssertionError(f"case {name!r}: {error}") from error
    malformed = {"content": b"--XyZ\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=XyZ"}}
    check_envelope(client.post("/predict", **malformed), 400, "bad_request")
    response = client.post("/predict", content=GOOD, headers={"content-type": "image/png"})
    check_envelope(response, 503, "no_classes")
    assert response.headers["retry-after"]
