"""The request body, streamed with a running byte count: refused (413) the moment it passes its limit, or at once
when Content-Length says so."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from starlette.requests import ClientDisconnect, Request

from service.ingest.limits import bad_request, too_large
from service.ingest.spool import Spool

__all__ = ["body_chunks", "read_body", "spool_body"]


async def body_chunks(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """Yields the body; 413 early on Content-Length and as soon as the running count passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.strip().isdigit():
        raise bad_request(f"Content-Length {declared!r} is not a byte count")
    hint = "send fewer or smaller images"
    if declared is not None and int(declared) > limit:
        raise too_large(f"request body of {int(declared)} bytes, the limit is {limit}; {hint}", {"limit": limit})
    total = 0
    try:
        async with contextlib.aclosing(request.stream()) as stream:
            async for chunk in stream:
                total += len(chunk)
                if total > limit:
                    raise too_large(f"request body over the limit of {limit} bytes; {hint}", {"limit": limit})
                if chunk:
                    yield chunk
    except ClientDisconnect as exc:
        raise bad_request("the client disconnected before the request body was complete") from exc


async def read_body(request: Request, limit: int) -> bytes:
    async with contextlib.aclosing(body_chunks(request, limit)) as chunks:
        return b"".join([chunk async for chunk in chunks])


async def spool_body(request: Request, limit: int, spool: Spool) -> None:
    async with contextlib.aclosing(body_chunks(request, limit)) as chunks:
        async for chunk in chunks:
            spool.append(chunk)
