"""Bounds on slow and concurrent requests, below and above the ASGI app (docs/api.md, "Limits").

Two layers, both installed by `care-serve serve` (see `serve`):

- `guarded_h11`: uvicorn's h11 protocol with two deadlines uvicorn lacks. A request line and headers must arrive
  within `header_timeout_s` of the connection opening (or of the previous response), however they trickle in;
  after a response, a body the app did not read must finish within `body_timeout_s`. A connection past either is
  closed (with a 408 in the error envelope when the client had started a request), so slowloris clients cannot
  hold file descriptors.
- `RequestGuard`: an ASGI middleware around the app. A body read that waits more than `body_timeout_s` for its
  next piece, or that averages less than `body_min_rate` bytes/s once `body_timeout_s` has passed, is answered
  408 `request_timeout` (with `Connection: close`). Request bodies in flight across all
  requests are capped at `upload_inflight_bytes`: a request whose Content-Length does not fit is answered 429
  `uploads_busy` with Retry-After before its body is read; a chunked body is counted as it arrives.

All of this runs on the event loop thread: the in-flight counter needs no lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import anyio
import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import ApiError, api_error, error_body
from service.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["InflightBytes", "RequestGuard", "guarded_h11", "serve"]

RETRY_AFTER_S = 5  # a fair guess: uploads in flight finish or time out within seconds


class InflightBytes:
    """A counter of request-body bytes admitted and not yet released, bounded by `capacity`."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.used = 0

    def take(self, size: int) -> bool:
        """Admit `size` more bytes if they fit under the capacity; False (nothing taken) otherwise."""
        if self.used + size > self.capacity:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


def _busy(capacity: int) -> ApiError:
    return api_error("uploads_busy", limit_bytes=capacity, retry_after=RETRY_AFTER_S)


def _timeout(reason: str) -> ApiError:
    return api_error("request_timeout", reason=reason)


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


_DISCONNECT: Message = {"type": "http.disconnect"}


class _WatchedBody:
    """One request's `receive` and `send`, with the stall timeout, the minimum rate and the in-flight accounting.

    A breach does not raise into the app (middlewares that wrap `receive` in task groups would turn that into a
    500): the app sees the client go away, and whatever it answers is replaced by the guard's 408 or 429.
    """

    def __init__(self, guard: RequestGuard, receive: Receive, send: Send, reserved: int) -> None:
        self.guard = guard
        self.inner_receive = receive
        self.inner_send = send
        self.reserved = reserved
        self.received = 0
        self.started: float | None = None
        self.done = False
        self.error: ApiError | None = None
        self.response_started = False
        self.error_sent = False

    def fail(self, error: ApiError) -> Message:
        self.error = error
        return _DISCONNECT

    async def receive(self) -> Message:
        if self.error is not None:
            return _DISCONNECT
        if self.done:
            return await self.inner_receive()
        guard = self.guard
        if self.started is None:
            self.started = guard.clock()
        try:
            with anyio.fail_after(guard.body_timeout_s):
                message = await self.inner_receive()
        except TimeoutError:
            logger.info("request body stalled for %.1f s after %d bytes: 408", guard.body_timeout_s, self.received)
            return self.fail(_timeout(f"no part of the request body arrived for {guard.body_timeout_s:g} s"))
        if message["type"] != "http.request":
            self.done = True
            return message
        self.received += len(message.get("body", b""))
        self.done = not message.get("more_body", False)
        if self.received > self.reserved:  # a chunked body (no Content-Length): counted as it arrives
            if not guard.inflight.take(self.received - self.reserved):
                return self.fail(_busy(guard.inflight.capacity))
            self.reserved = self.received
        elapsed = guard.clock() - self.started
        if not self.done and guard.body_min_rate and elapsed > guard.body_timeout_s:
            rate = self.received / elapsed
            if rate < guard.body_min_rate:
                logger.info("request body at %.0f bytes/s after %.1f s: 408", rate, elapsed)
                minimum = guard.body_min_rate
                return self.fail(_timeout(f"the request body arrives at {rate:.0f} bytes/s, below {minimum} bytes/s"))
        return message

    async def send(self, message: Message) -> None:
        if self.error is None or self.response_started:
            self.response_started = self.response_started or message["type"] == "http.response.start"
            await self.inner_send(message)
            return
        await self.send_error()  # the app's own answer to the "disconnect" is dropped

    async def send_error(self) -> None:
        if self.error is not None and not self.error_sent and not self.response_started:
            self.error_sent = True
            error = self.error
            await _send_json(self.inner_send, error.status, error_body(error.code, error.message, error.details),
                             error.headers)  # fmt: skip


class RequestGuard:
    """ASGI middleware: 408 for stalled or too slow request bodies, 429 beyond the in-flight byte cap.

    Args:
        app: The application.
        body_timeout_s: Longest wait for the next piece of a body; also the grace period of the minimum rate.
        body_min_rate: Bytes/s a body must average once `body_timeout_s` has passed; 0 = no minimum.
        inflight: The shared counter of body bytes in flight.
        max_body_bytes: Bodies declared larger are not counted (the app refuses them with 413 unread).
        clock: Monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        body_timeout_s: float,
        body_min_rate: int,
        inflight: InflightBytes,
        max_body_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.body_min_rate = body_min_rate
        self.inflight = inflight
        self.max_body_bytes = max_body_bytes
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        reserved = declared if declared is not None and 0 < declared <= self.max_body_bytes else 0
        if not self.inflight.take(reserved):
            logger.info("refusing a %d-byte body: %d bytes in flight, limit %d", reserved, self.inflight.used,
                        self.inflight.capacity)  # fmt: skip
            error = _busy(self.inflight.capacity)
            await _send_json(send, error.status, error_body(error.code, error.message, error.details), error.headers)
            return
        body = _WatchedBody(self, receive, send, reserved)
        try:
            await self.app(scope, body.receive, body.send)
            await body.send_error()  # the app returned without answering
        finally:
            self.inflight.give(body.reserved)


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode("ascii")
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


_Phase = Literal["headers", "drain"] | None


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head and on draining an unread body."""

    header_timeout_s: float  # both set by guarded_h11, from the settings
    drain_timeout_s: float

    _phase: _Phase = None
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline of the phase the connection is in; a phase keeps its deadline however data trickles."""
        phase: _Phase = None
        if not self.transport.is_closing():
            state = self.conn.their_state
            if state is h11.IDLE:
                phase = "headers"
            elif state is h11.SEND_BODY and (self.cycle is None or self.cycle.response_complete):
                phase = "drain"  # the app answered without reading the whole body; h11 discards the rest
        if phase != self._phase:
            self._arm(phase)

    def _arm(self, phase: _Phase) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        if phase is not None:
            delay = self.header_timeout_s if phase == "headers" else self.drain_timeout_s
            self._timer = self.loop.call_later(delay, self._expired, phase)

    def _expired(self, phase: _Phase) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        started = bool(self.conn.trailing_data[0])  # bytes of a request head that never completed
        if phase == "headers" and started and self.conn.our_state is h11.IDLE:
            message = f"the request line and headers did not arrive within {self.header_timeout_s:g} s"
            payload = json.dumps(error_body("request_timeout", message)).encode("ascii")
            head = (
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode("ascii") + payload)
        logger.debug("closing a connection whose %s took longer than allowed", phase)
        self.transport.close()


def guarded_h11(header_timeout_s: float, drain_timeout_s: float) -> type[H11Protocol]:
    """The h11 protocol class to give uvicorn (`http=`), with these deadlines."""
    attributes = {"header_timeout_s": header_timeout_s, "drain_timeout_s": drain_timeout_s}
    return type("GuardedH11Protocol", (_GuardedH11,), attributes)


def guard_app(app: ASGIApp, settings: Settings) -> RequestGuard:
    """`app` behind the body timeouts and the in-flight cap of `settings`."""
    return RequestGuard(
        app,
        body_timeout_s=settings.body_timeout_s,
        body_min_rate=settings.body_min_rate,
        inflight=InflightBytes(settings.upload_inflight_bytes),
        max_body_bytes=settings.max_upload_bytes,
    )


def serve(app: ASGIApp, settings: Settings) -> None:
    """Run `app` with uvicorn on the configured address, behind both guards (blocks until shut down)."""
    import uvicorn

    uvicorn.run(
        guard_app(app, settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
        http=guarded_h11(settings.header_timeout_s, settings.body_timeout_s),
        timeout_keep_alive=max(1, math.ceil(min(5.0, settings.header_timeout_s))),
    )
