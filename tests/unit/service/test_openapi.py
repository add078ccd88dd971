"""The OpenAPI document describes what the handlers do (tests/e2e/test_openapi_contract.py fuzzes it for real)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

ENVELOPE = {"$ref": "#/components/schemas/ErrorEnvelope"}


def document(**settings: Any) -> dict[str, Any]:
    app = create_app(Settings(backbone="test_vit", backbone_weights="random", **settings))
    schema: dict[str, Any] = app.openapi()
    return schema


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document()


def operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{m.upper()} {p}": op for p, ops in doc["paths"].items() for m, op in ops.items()}


def test_every_error_status_uses_the_envelope_never_fastapis_detail(doc: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["components"]["schemas"]["ErrorEnvelope"]["required"] == ["error"]
    assert set(doc["components"]["schemas"]["ErrorInfo"]["required"]) == {"code", "message", "details"}
    errors = 0
    for name, op in operations(doc).items():
        for status, response in op["responses"].items():
            if int(status) >= 400:
                assert response["content"]["application/json"]["schema"] == ENVELOPE, (name, status)
                errors += 1
    assert errors == 17  # 7 for POST /tasks, 7 for POST /predict, 2 for GET /tasks/{task_id}, 1 for /readyz


@pytest.mark.parametrize(
    ("operation", "statuses"),
    [
        ("POST /tasks", {"202", "400", "408", "409", "413", "415", "422", "429"}),
        ("POST /predict", {"200", "400", "408", "413", "415", "422", "429", "503"}),
        ("GET /tasks/{task_id}", {"200", "404", "422"}),
        ("GET /readyz", {"200", "503"}),
    ],
)
def test_statuses_the_handlers_answer_are_documented(doc: dict[str, Any], operation: str, statuses: set[str]) -> None:
    assert set(operations(doc)[operation]["responses"]) == statuses


def test_retry_after_and_location_headers_are_documented(doc: dict[str, Any]) -> None:
    ops = operations(doc)
    assert ops["POST /tasks"]["responses"]["202"]["headers"]["Location"]["required"] is True
    for name, status in (("POST /tasks", "429"), ("POST /predict", "429"), ("POST /predict", "503")):
        assert "Retry-After" in ops[name]["responses"][status]["headers"]


def test_upload_request_bodies(doc: dict[str, Any]) -> None:
    ops = operations(doc)
    tasks = ops["POST /tasks"]["requestBody"]["content"]
    assert set(tasks) == {"multipart/form-data", "application/zip", "application/x-tar"}
    form = tasks["multipart/form-data"]["schema"]
    assert form["required"] == ["images", "labels"] and form["properties"]["images"]["items"]["format"] == "binary"
    assert set(form["properties"]) == {"images", "labels", "name", "archive"}
    predict = ops["POST /predict"]["requestBody"]["content"]
    assert predict["multipart/form-data"]["schema"]["required"] == ["images"]
    assert {"image/png", "image/jpeg"} <= set(predict)


def test_metrics_is_plain_text(doc: dict[str, Any]) -> None:
    assert set(operations(doc)["GET /metrics"]["responses"]["200"]["content"]) == {"text/plain"}


def test_security_follows_the_configuration(doc: dict[str, Any]) -> None:
    assert set(doc["components"]["securitySchemes"]) == {"AdminToken", "ApiKey", "ApiKeyBearer"}
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": doc["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    for name, op in operations(doc).items():
        assert "security" not in op, name
        assert not {"401", "403"} & set(op["responses"]), name  # auth off: never answered

    guarded = operations(document(admin_token="a", api_key="b"))
    for name in ("POST /tasks", "GET /tasks", "GET /tasks/{task_id}"):
        assert guarded[name]["security"] == [{"AdminToken": []}]
        assert {"401", "403"} <= set(guarded[name]["responses"])
    assert guarded["POST /predict"]["security"] == [{"ApiKey": []}, {"ApiKeyBearer": []}]
    assert "security" not in guarded["GET /metrics"] and "security" not in guarded["GET /healthz"]


def test_options_and_wrong_methods_name_every_method_of_the_path(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, backbone="test_vit", backbone_weights="random", image_size=32)
    with TestClient(create_app(settings, start_worker=False)) as client:
        check_allow(client)


def check_allow(client: TestClient) -> None:
    response = client.options("/tasks")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"  # Starlette alone said "POST": the first route's methods
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert client.delete("/predict").headers["allow"] == "POST"
    assert client.put("/tasks/t-0123456789ab").headers["allow"] == "GET"
    assert client.head("/tasks").headers["allow"] == "GET, POST"  # HEAD is not served: Allow does not claim it
