"""The published OpenAPI document as the contract: request bodies, every error status with its envelope, auth.

FastAPI derives a document from the route signatures, but the upload routes read their bodies themselves
(``service.ingest.uploads``), errors use our envelope rather than FastAPI's ``{"detail"}``, and auth is a dependency it
cannot see. The routes declare their bodies and error statuses with the constants below (``openapi_extra=``,
``responses=``); ``install_openapi`` then fixes what is global: every 422 shows the envelope, the security schemes
exist, and operations name the credentials this server's configuration actually requires.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from service.ingest.limits import UploadLimits
from service.ingest.uploads import MAX_NAME_CHARS
from service.settings import Settings

__all__ = [
    "GET_TASK_RESPONSES",
    "LIST_TASKS_RESPONSES",
    "METRICS_RESPONSES",
    "PREDICT_BODY",
    "PREDICT_RESPONSES",
    "READYZ_RESPONSES",
    "SUBMIT_TASK_RESPONSES",
    "TASKS_BODY",
    "ErrorEnvelope",
    "build_openapi",
    "error_responses",
    "install_openapi",
]


class ErrorInfo(BaseModel):
    code: str = Field(description="Machine-readable code (docs/api.md), e.g. `invalid_image`, `label_exists`.")
    message: str = Field(description="What was wrong and what to do.")
    details: dict[str, Any] = Field(description="Structured details: offending labels, images, limits...")


class ErrorEnvelope(BaseModel):
    """Every error answer: `{"error": {"code", "message", "details"}}`."""

    error: ErrorInfo


_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "required": True, "schema": {"type": "string"}}
}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`.", "required": True, "schema": {"type": "string"}}}

_DESCRIPTIONS = {
    400: "Malformed body: unparseable multipart or archive, labels count differs from images count, empty upload "
    "(`bad_request`).",
    401: "A credential is required and missing (`unauthorized`); only when the server is configured with one.",
    403: "The credential is wrong (`forbidden`).",
    404: "Unknown resource (`task_not_found`).",
    409: "A label is already learned or queued (`label_exists`); `details.labels` lists them.",
    413: "Body, image count, image bytes or pixels over the configured limits (`too_large`).",
    408: "The request body stalled or arrived slower than the configured minimum rate (`request_timeout`).",
    415: "Content-Type not accepted here (`unsupported_media_type`); `details.accepted` lists what is.",
    422: "Invalid input: `validation_error` (query or header), `invalid_image`, `invalid_label`, `invalid_name`, "
    "`too_few_images`, `idempotency_key_reused`.",
    429: "Busy (`queue_full` for /tasks, `overloaded` for /predict, `uploads_busy`): retry after `Retry-After` "
    "seconds.",
    503: "Not able to answer now (`no_classes`: nothing learned yet; `not_ready`; `registry_unreadable`; "
    "`shutting_down`): retry after `Retry-After` seconds.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with the error envelope (and Retry-After/WWW-Authenticate)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {"model": ErrorEnvelope, "description": _DESCRIPTIONS[status]}
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        elif status == 401:
            response["headers"] = _WWW_AUTHENTICATE
        responses[status] = response
    return responses


_LOCATION = {"Location": {"description": "`/tasks/{task_id}`.", "required": True, "schema": {"type": "string"}}}

# responses= of each route: success extras plus every error status its handler (or its auth guard) can answer.
SUBMIT_TASK_RESPONSES = {
    202: {"description": "Queued; the upload is durable.", "headers": _LOCATION},
    **error_responses(400, 401, 403, 408, 409, 413, 415, 422, 429),
}
GET_TASK_RESPONSES = error_responses(401, 403, 404)
LIST_TASKS_RESPONSES = error_responses(401, 403)
PREDICT_RESPONSES = error_responses(400, 401, 403, 408, 413, 415, 422, 429, 503)
READYZ_RESPONSES = error_responses(503)
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}

_BINARY = {"type": "string", "format": "binary"}
_LABEL = {"type": "string", "minLength": 1, "maxLength": UploadLimits.max_label_length}  # the default limit

TASKS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Labelled images of new classes: multipart `images` + `labels` (one label per image, or one "
        "field holding a JSON list), or an ImageFolder archive `<label>/<file>` as a multipart `archive` part or as "
        "the raw body.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": _BINARY, "minItems": 1},
                        "labels": {"type": "array", "items": _LABEL, "minItems": 1},
                        "name": {"type": "string", "maxLength": MAX_NAME_CHARS},
                        "archive": _BINARY,
                    },
                    "required": ["images", "labels"],
                },
                "encoding": {"images": {"contentType": "image/png, image/jpeg, image/*"}},
            },
            "application/zip": {"schema": _BINARY},
            "application/x-tar": {"schema": _BINARY},
        },
    }
}

PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Images to classify: multipart parts named `images`, or one image as the raw body.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": _BINARY, "minItems": 1}},
                    "required": ["images"],
                },
                "encoding": {"images": {"contentType": "image/png, image/jpeg, image/*"}},
            },
            "image/png": {"schema": _BINARY},
            "image/jpeg": {"schema": _BINARY},
        },
    }
}

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "AdminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <CARE_ADMIN_TOKEN>`: required by /tasks when the server has one.",
    },
    "ApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "`X-API-Key: <CARE_API_KEY>`: required by /predict when the server has one.",
    },
    "ApiKeyBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <CARE_API_KEY>`: the alternative form of the /predict key.",
    },
}


def _security(path: str, settings: Settings) -> list[dict[str, list[str]]] | None:
    if path.startswith("/tasks") and settings.admin_token is not None:
        return [{"AdminToken": []}]
    if path == "/predict" and settings.api_key is not None:
        return [{"ApiKey": []}, {"ApiKeyBearer": []}]
    return None


def _envelope_for_validation_errors(schema: dict[str, Any]) -> None:
    """FastAPI documents its own 422 body (`HTTPValidationError`); ours is the envelope (service.errors)."""
    ref = {"$ref": "#/components/schemas/ErrorEnvelope"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422")
            if response is not None:
                response["description"] = _DESCRIPTIONS[422]
                response["content"] = {"application/json": {"schema": ref}}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    if "ErrorEnvelope" not in components:
        generated = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(generated.pop("$defs", {}))
        components["ErrorEnvelope"] = generated


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The document of ``app`` as configured by ``settings`` (auth requirements follow the configuration)."""
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes, servers=app.servers
    )
    _envelope_for_validation_errors(schema)
    schema["components"]["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in schema["paths"].items():
        security = _security(path, settings)
        for operation in operations.values():
            if security is not None:
                operation["security"] = security
            else:  # auth off on this server: drop the statuses it cannot answer
                if path.startswith("/tasks") or path == "/predict":
                    for status in ("401", "403"):
                        operation.get("responses", {}).pop(status, None)
    return schema


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Make ``app.openapi()`` (and /openapi.json, /docs) serve ``build_openapi``, computed once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
