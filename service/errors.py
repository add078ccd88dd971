"""The API's error envelope and the one place that maps errors to HTTP responses.

Every error answer has the body `{"error": {"code", "message", "details"}}` (see docs/api.md). Domain code raises
`ApiError` (or a subclass) with a machine code and a message that says what was wrong and what to do; the
handlers registered by `install_error_handlers` turn it into a response. Anything unexpected becomes a 500 with a
request id and no traceback in the body: a 5xx other than 503 with Retry-After is a bug.
"""

from __future__ import annotations

import logging
import uuid
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


def install_error_handlers(app: FastAPI) -> None:
    """Register the envelope for ApiError, FastAPI's own errors and anything unexpected."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

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
        message = "; ".join(f"{p['location']}: {p['problem']}" for p in problems) or "invalid request"
        return JSONResponse(error_body("validation_error", message, {"errors": problems}), status_code=422)

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex[:12]
        logger.exception("unhandled error (request id %s)", request_id, exc_info=exc)
        return JSONResponse(
            error_body("internal_error", f"internal error; quote request id {request_id} when reporting it"),
            status_code=500,
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
