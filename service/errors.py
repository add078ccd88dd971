"""The API's error envelope and the one place that maps errors to HTTP responses.

Every error answer has the body `{"error": {"code", "message", "details"}}` (see docs/api.md). `ERRORS` is the
table of the API's errors: code -> status, message template, headers and details. Routes, the batcher and the
request readers (service/ingest/) raise `api_error(code, **fields)`; the domain exceptions of layers that know
nothing of HTTP (the job store) name their code in a `code` class attribute and reach the same table through the
handler `install_error_handlers` registers for them. Anything unexpected becomes a 500 with a request id and no
traceback in the body: a 5xx other than 503 with Retry-After is a bug.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client can act on.

    Args:
        status: HTTP status code.
        code: Machine-readable code from docs/api.md (e.g. "invalid_image").
        message: What was wrong and what to do.
        details: Structured details (e.g. the offending labels or file names).
        headers: Extra response headers (e.g. Retry-After).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


Fields = dict[str, Any]


def _retry_after(fields: Fields) -> Fields:
    """`retry_after`: whole seconds for the Retry-After header, at least 1, from the estimate `retry_after_s`."""
    return {"retry_after": max(1, round(fields["retry_after_s"]))}


def _first_labels(fields: Fields) -> Fields:
    """`count` and `shown` (the first ten, comma-separated) of `labels`."""
    labels = fields["labels"]
    return {"count": len(labels), "shown": ", ".join(labels[:10])}


def _media_types(fields: Fields) -> Fields:
    """`shown`, the refused Content-Type or "(none)", and `accepted_list`, the accepted ones comma-separated."""
    return {"shown": fields["content_type"] or "(none)", "accepted_list": ", ".join(fields["accepted"])}


def _ascii_name(fields: Fields) -> Fields:
    """`shown`, the client's `name` in ASCII (rendering it can never fail), `entries` and `reason` for details."""
    shown = ascii(fields["name"])
    return {"shown": shown, "entries": [shown[1:-1]], "reason": fields["problem"]}


def _count_of(name: str) -> Callable[[Fields], Fields]:
    """A `derive` that sets `count` to the length of the field `name`."""
    return lambda fields: {"count": len(fields[name])}


@dataclass(frozen=True)
class ErrorRule:
    """How the API answers one kind of error.

    Attributes:
        status: HTTP status code.
        code: Machine-readable code from docs/api.md.
        message: `str.format` template of the message, over the error's fields.
        headers: Response headers; values are templates too (e.g. Retry-After).
        details: Fields copied into `details`, under their own names.
        derive: Fields computed from the others before formatting (e.g. whole seconds from an estimate).
        composed: The raiser composes the message (the `message` field, for a template of "{message}") and the
            details (the `details` field, a dict or None): codes raised by many different checks, each of which
            says what it found (the request readers' `bad_request`, `too_large`, `invalid_image`).
    """

    status: int
    code: str
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)
    details: tuple[str, ...] = ()
    derive: Callable[[Fields], Fields] | None = None
    composed: bool = False

    def error(self, **fields: Any) -> ApiError:
        """The `ApiError` this rule answers for `fields`."""
        if self.derive is not None:
            fields = {**fields, **self.derive(fields)}
        details = dict(fields.get("details") or {}) if self.composed else {}
        details.update((name, fields[name]) for name in self.details)
        return ApiError(
            self.status,
            self.code,
            self.message.format(**fields),
            details,
            {name: value.format(**fields) for name, value in self.headers.items()},
        )


_LABELS_TAKEN = (
    "{count} label(s) are already learned or queued: {shown}; class-incremental learning needs new labels (rename "
    "them, e.g. 'cat-2')"
)
_KEY_REUSED = (
    "the Idempotency-Key was first used for task {task_id} with different images, labels or name; retry with exactly "
    "the same request, or send a new key for a new task"
)
_BAD_LABELS = (
    "{count} invalid label(s): {shown}. Fix them: labels are 1 to {max_length} characters, without control "
    "characters, '/', '\\' or surrounding spaces, not '.' or '..'"
)
_BAD_NAME = "{what} {shown} {problem}; name files and folders in UTF-8 without non-characters"
_TOO_FEW = "every class needs at least {min_images_per_class} images, {count} have fewer: {shown}; add images"
_BUSY = "the server already receives {limit_bytes} bytes of request bodies, its limit; retry in {retry_after} s"

# Every error the routes, the batcher, the request readers and the job store answer with, by code. docs/api.md
# lists the same codes.
ERRORS: dict[str, ErrorRule] = {
    rule.code: rule
    for rule in (
        # The request readers (service/ingest/).
        ErrorRule(400, "bad_request", "{message}", composed=True),
        ErrorRule(408, "request_timeout", "{reason}; send the request body without pauses", {"Connection": "close"}),
        ErrorRule(413, "too_large", "{message}", composed=True),
        ErrorRule(
            415,
            "unsupported_media_type",
            "Content-Type {shown!r} is not accepted here; send one of: {accepted_list}",
            details=("content_type", "accepted"),
            derive=_media_types,
        ),
        ErrorRule(422, "invalid_image", "{message}", composed=True),
        ErrorRule(422, "invalid_label", _BAD_LABELS, details=("labels",), derive=_count_of("labels")),
        ErrorRule(422, "invalid_name", _BAD_NAME, details=("entries", "reason"), derive=_ascii_name),
        ErrorRule(
            422,
            "too_few_images",
            _TOO_FEW,
            details=("min_images_per_class", "counts", "classes"),
            derive=_count_of("classes"),
        ),
        ErrorRule(429, "uploads_busy", _BUSY, {"Retry-After": "{retry_after}"}, details=("limit_bytes",)),
        # The routes, the batcher and the job store.
        ErrorRule(401, "unauthorized", "{what} required: {how}", {"WWW-Authenticate": "Bearer"}),
        ErrorRule(403, "forbidden", "the {what} is not valid for this server"),
        ErrorRule(404, "task_not_found", "no task {task_id!r}; GET /tasks lists the known tasks", details=("task_id",)),
        ErrorRule(409, "label_exists", _LABELS_TAKEN, details=("labels",), derive=_first_labels),
        ErrorRule(422, "idempotency_key_reused", _KEY_REUSED, details=("task_id",)),
        ErrorRule(422, "validation_error", "{summary}", details=("errors",)),
        ErrorRule(
            429,
            "queue_full",
            "{max_queued} tasks are already waiting to be trained; retry later",
            {"Retry-After": "{retry_after}"},
            derive=_retry_after,
        ),
        ErrorRule(
            429,
            "overloaded",
            "{queued_images} images are waiting for inference; retry after {retry_after} s or send fewer images",
            {"Retry-After": "{retry_after}"},
            details=("queued_images",),
            derive=_retry_after,
        ),
        ErrorRule(500, "internal_error", "internal error; quote request id {request_id} when reporting it"),
        ErrorRule(503, "not_ready", "the model is still loading", {"Retry-After": "2"}),
        ErrorRule(503, "registry_unreadable", "the registry cannot be read: {reason}", {"Retry-After": "5"}),
        ErrorRule(
            503,
            "no_classes",
            "nothing has been learned yet: POST labelled images to /tasks first",
            {"Retry-After": "5"},
        ),
        ErrorRule(503, "shutting_down", "the server is shutting down; retry", {"Retry-After": "1"}),
    )
}


def api_error(code: str, **fields: Any) -> ApiError:
    """The `ApiError` that `ERRORS[code]` answers for `fields` (raise it)."""
    return ERRORS[code].error(**fields)


def safe_text(text: str) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates from undecodable bytes) as a backslash escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _safe(value: Any) -> Any:
    """A JSON-able value whose strings (keys included) all encode as UTF-8, so rendering an error cannot raise."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {_safe(key): _safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_safe(item) for item in value]
    return value


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": safe_text(message), "details": _safe(details or {})}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(error.code, error.message, error.details), status_code=error.status, headers=error.headers
    )


# Codes of the errors FastAPI and Starlette answer themselves (unknown path, wrong method, ...), by status.
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "validation_error",
}


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method some route of the app serves at the request's path (for the Allow header of a 405)."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    )


def install_error_handlers(app: FastAPI, domain_errors: tuple[type[Exception], ...] = ()) -> None:
    """Register the envelope for ApiError, `domain_errors`, FastAPI's own errors and anything unexpected.

    Args:
        app: The application.
        domain_errors: Base classes of exceptions that name their error code in a `code` class attribute (the job
            store's `JobStoreError`); the handler answers them from `ERRORS`, with the exception's attributes as
            fields. One whose `code` is None is not the client's doing and is answered like anything unexpected.
    """

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_domain_error(_: Request, exc: Exception) -> JSONResponse:
        code = getattr(exc, "code", None)
        if code is None:
            raise exc  # on to on_unexpected (a 500), as if no handler had seen it
        return error_response(api_error(code, **vars(exc)))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names only the first route's methods; a path can have several
            headers["Allow"] = _allowed_methods(request)
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers or None)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [
            {"location": ".".join(str(p) for p in error.get("loc", ())), "problem": error.get("msg", "")}
            for error in exc.errors()
        ]
        summary = "; ".join(f"{p['location']}: {p['problem']}" for p in problems) or "invalid request"
        return error_response(api_error("validation_error", summary=summary, errors=problems))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex[:12]
        logger.exception("unhandled error (request id %s)", request_id, exc_info=exc)
        return error_response(api_error("internal_error", request_id=request_id))

    app.add_exception_handler(ApiError, on_api_error)
    for domain_error in domain_errors:
        app.add_exception_handler(domain_error, on_domain_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
