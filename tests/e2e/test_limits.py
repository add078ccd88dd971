"""Slow and concurrent requests against a real `care-serve serve` on loopback (service/ingest/guard.py).

A slowloris crowd is closed within the header timeout and the server's file descriptors return to their baseline;
a stalled or too slow body gets 408 in the error envelope; bodies beyond the in-flight cap get 429 with
Retry-After. Every wait is bounded; all sockets are on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.harness import Process, base_env, free_port, start_server, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

TIMEOUT_S = 2.0
INFLIGHT = 1 << 20
SLOW_CLIENTS = 50


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, int]]:
    tmp = tmp_path_factory.mktemp("limits")
    env = base_env(
        data_dir=str(tmp / "data"),
        backbone="test_vit",
        backbone_weights="random",
        image_size="32",
        device="cpu",
        serve_threads="1",
        header_timeout_s=str(TIMEOUT_S),
        body_timeout_s=str(TIMEOUT_S),
        body_min_rate="2000",
        upload_inflight_bytes=str(INFLIGHT),
    )
    port = free_port()
    process = start_server("server", port, env, tmp, "--no-worker")
    yield process, port
    process.stop()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket, timeout_s: float) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and JSON body of the one response on `sock` (read until the server closes or it is whole)."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, json.loads(body)


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 1 << 30


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed `sock` (reads drain any response first)."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slowloris_connections_are_closed_in_time_and_fds_return(server: tuple[Process, int]) -> None:
    process, port = server
    baseline = open_fds(process.pid)
    started = time.monotonic()
    sockets = [connect(port) for _ in range(SLOW_CLIENTS)]
    for sock in sockets:
        sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    closed_at: dict[int, float] = {}

    def note_closed() -> None:
        for i, sock in enumerate(sockets):
            if i not in closed_at and closed_by_peer(sock):
                closed_at[i] = time.monotonic() - started

    def accepted() -> bool | None:
        # On a loaded box the first connections can reach their header timeout before the last is accepted: a
        # connection already closed by the server was accepted too.
        # Every connection closed by the server was accepted, whatever the fd count: the baseline can include a
        # descriptor the server closes meanwhile (seen: baseline 18, then 17 open with all 50 closed, never 68).
        note_closed()
        seen.append((open_fds(process.pid), len(closed_at)))
        return len(closed_at) == SLOW_CLIENTS or sum(seen[-1]) >= baseline + SLOW_CLIENTS or None

    seen: list[tuple[int, int]] = []
    diagnose = lambda: f"fds baseline {baseline}, (open fds, closed) {seen[-5:]}\n{process.tail()}"  # noqa: E731
    wait_until("the server to accept every connection", accepted, 20, diagnose)
    deadline = started + TIMEOUT_S + 8
    while len(closed_at) < len(sockets) and time.monotonic() < deadline:
        for i, sock in enumerate(sockets):
            if i in closed_at:
                continue
            if closed_by_peer(sock):
                closed_at[i] = time.monotonic() - started
                continue
            try:
                sock.send(b"X")  # one more byte of an endless header: a classic slowloris
            except OSError:
                closed_at[i] = time.monotonic() - started
        time.sleep(0.25)
    for sock in sockets:
        sock.close()
    assert len(closed_at) == SLOW_CLIENTS, f"{SLOW_CLIENTS - len(closed_at)} slow connections were still open"
    assert max(closed_at.values()) < TIMEOUT_S + 4, sorted(closed_at.values())
    assert min(closed_at.values()) >= TIMEOUT_S - 0.5  # closed by the deadline, not by something else earlier
    wait_until("fds back to baseline", lambda: open_fds(process.pid) <= baseline + 2 or None, 10, process.tail)


def test_a_slowloris_that_started_a_request_gets_408_in_the_envelope(server: tuple[Process, int]) -> None:
    _, port = server
    with connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        status, headers, body = read_response(sock, TIMEOUT_S + 5)
        assert TIMEOUT_S - 0.5 <= time.monotonic() - started < TIMEOUT_S + 4
    assert (status, headers["connection"], body["error"]["code"]) == (408, "close", "request_timeout")


def post_head(length: int, path: str = "/tasks", content_type: str = "application/zip") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_stalled_body_gets_408_and_the_connection_closes(server: tuple[Process, int]) -> None:
    _, port = server
    with connect(port) as sock:
        sock.sendall(post_head(100_000) + b"PK\x03\x04" + b"\0" * 100)
        started = time.monotonic()
        status, headers, body = read_response(sock, TIMEOUT_S + 5)
        assert TIMEOUT_S - 0.5 <= time.monotonic() - started < TIMEOUT_S + 4
        assert (status, headers.get("connection"), body["error"]["code"]) == (408, "close", "request_timeout")
        assert "no part of the request body" in body["error"]["message"]
        wait_until("the server to close", lambda: closed_by_peer(sock) or None, 5, lambda: "")


def test_a_body_under_the_minimum_rate_gets_408(server: tuple[Process, int]) -> None:
    _, port = server
    with connect(port) as sock:
        sock.sendall(post_head(100_000))
        started = time.monotonic()
        response = None
        while time.monotonic() - started < TIMEOUT_S + 6:
            sock.sendall(b"\0" * 200)  # 800 bytes/s: never a pause of TIMEOUT_S, but under the 2000 bytes/s minimum
            sock.settimeout(0.25)
            try:
                response = sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                continue
            break
        assert response, "no answer to a body trickling under the minimum rate"
        status, _, body = read_response(sock, 5)
    assert (status, body["error"]["code"]) == (408, "request_timeout")
    assert "bytes/s" in body["error"]["message"]


def test_bodies_beyond_the_inflight_cap_get_429_with_retry_after(server: tuple[Process, int], tmp_path: Path) -> None:
    _, port = server
    size = INFLIGHT * 2 // 3  # one fits under the cap, two do not
    with connect(port) as holder:
        holder.sendall(post_head(size) + b"PK\x03\x04")  # admitted; its body is in flight while we ask again
        time.sleep(0.5)
        with connect(port) as second:
            second.sendall(post_head(size))
            status, headers, body = read_response(second, 5)
        assert (status, body["error"]["code"]) == (429, "uploads_busy"), body
        assert int(headers["retry-after"]) >= 1 and body["error"]["details"]["limit_bytes"] == INFLIGHT
        with connect(port) as small:  # what still fits is served as usual
            small.sendall(post_head(4, "/predict", "image/png") + b"\x89PNG")
            status, _, body = read_response(small, 10)
            assert status != 429, body
    # Once the first body is gone (its client left), the same size is admitted again.
    time.sleep(0.5)
    with connect(port) as third:
        third.sendall(post_head(size) + b"\0" * size)
        status, _, body = read_response(third, 20)
    assert status == 400 and body["error"]["code"] == "bad_request", body  # junk, but not refused for capacity
