"""Measure care-serve's bounds on slow and concurrent requests (docs/reliability.md); not a test, a probe.

Starts a real `care-serve serve --no-worker` on a loopback port (bench/harness.py) and measures:

1. slowloris: N connections that send a request line, then one header byte a second forever; when is each one
   closed, and how many file descriptors does the server hold before, at the peak and afterwards;
2. concurrent uploads: K clients each stream a Z MiB zip of junk "images" (a valid zip of random bytes) at once;
   the server's RSS before and its peak while they are read and refused.

    .venv/bin/python tools/probe_limits.py --connections 300 --uploads 4 --upload-mib 250
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx

from bench.harness import base_env, free_port, start_server


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def slowloris(pid: int, port: int, connections: int, limit_s: float) -> dict[str, Any]:
    baseline = open_fds(pid)
    started = time.monotonic()
    sockets = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.setblocking(False)
        sockets.append(sock)
    peak = open_fds(pid)
    closed_at: dict[int, float] = {}
    while len(closed_at) < connections and time.monotonic() - started < limit_s:
        peak = max(peak, open_fds(pid))
        for i, sock in enumerate(sockets):
            if i in closed_at:
                continue
            try:
                if sock.recv(65536) == b"":
                    closed_at[i] = time.monotonic() - started
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic() - started
                continue
            try:
                sock.send(b"X")
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic() - started
        time.sleep(1.0)
    for sock in sockets:
        sock.close()
    time.sleep(2.0)
    times = sorted(closed_at.values())
    return {
        "connections": connections,
        "closed": len(times),
        "first_closed_s": round(times[0], 2) if times else None,
        "last_closed_s": round(times[-1], 2) if times else None,
        "fds_before": baseline,
        "fds_peak": peak,
        "fds_after": open_fds(pid),
    }


def junk_zip(path: Path, mib: int) -> None:
    """A valid zip (stored) of 2 MiB members of random bytes in two label folders: every "image" is junk."""
    rng = random.Random(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for i in range(mib // 2):
            archive.writestr(f"{'ab'[i % 2]}/{i}.png", rng.randbytes(2 * 1024 * 1024))


def uploads(pid: int, port: int, clients: int, archive: Path) -> dict[str, Any]:
    before = rss_bytes(pid)
    peak = before
    statuses: list[int] = []

    def send() -> None:
        with archive.open("rb") as body:
            response = httpx.post(
                f"http://127.0.0.1:{port}/tasks",
                content=iter(lambda: body.read(1024 * 1024), b""),
                headers={"content-type": "application/zip", "content-length": str(archive.stat().st_size)},
                timeout=600,
            )
        statuses.append(response.status_code)

    threads = [threading.Thread(target=send) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_bytes(pid))
        time.sleep(0.05)
    return {
        "clients": clients,
        "upload_bytes": archive.stat().st_size,
        "statuses": sorted(statuses),
        "seconds": round(time.monotonic() - started, 1),
        "rss_before_mib": round(before / 2**20),
        "rss_peak_mib": round(peak / 2**20),
        "rss_added_mib": round((peak - before) / 2**20),
        "rss_after_mib": round(rss_bytes(pid) / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--header-timeout-s", type=float, default=10.0)
    parser.add_argument("--uploads", type=int, default=4)
    parser.add_argument("--upload-mib", type=int, default=250)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-limits-") as tmp:
        root = Path(tmp)
        env = base_env(data_dir=str(root / "data"), backbone=args.backbone, device="cpu",
                       header_timeout_s=str(args.header_timeout_s))  # fmt: skip
        port = free_port()
        server = start_server("server", port, env, root, "--no-worker")
        try:
            result: dict[str, Any] = {"header_timeout_s": args.header_timeout_s}
            result["slowloris"] = slowloris(server.pid, port, args.connections, args.header_timeout_s + 60)
            archive = root / "junk.zip"
            junk_zip(archive, args.upload_mib)
            httpx.post(f"http://127.0.0.1:{port}/predict", content=b"x", headers={"content-type": "image/png"})
            result["uploads"] = uploads(server.pid, port, args.uploads, archive)
            print(json.dumps(result, indent=2))  # noqa: T201 - the numbers are the output
        finally:
            server.stop()


if __name__ == "__main__":
    main()
