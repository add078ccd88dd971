"""Dependencies shared by the routes: the app state and the two auth guards."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from service.errors import api_error
from service.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.care
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check(secret: SecretStr | None, given: str | None, what: str, how: str) -> None:
    if secret is None:
        return
    if given is None:
        raise api_error("unauthorized", what=what, how=how)
    if not hmac.compare_digest(given.encode(), secret.get_secret_value().encode()):
        raise api_error("forbidden", what=what)


def require_admin(request: Request, state: StateDep) -> None:
    """Guards /tasks when CARE_ADMIN_TOKEN is set: `Authorization: Bearer <token>`."""
    _check(state.settings.admin_token, _bearer(request), "admin token", "send 'Authorization: Bearer <admin token>'")


def require_api_key(request: Request, state: StateDep) -> None:
    """Guards /predict when CARE_API_KEY is set: `X-API-Key: <key>` or `Authorization: Bearer <key>`."""
    given = request.headers.get("x-api-key") or _bearer(request)
    _check(state.settings.api_key, given, "API key", "send 'X-API-Key: <key>' or 'Authorization: Bearer <key>'")
