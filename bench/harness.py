"""Real `care-serve` processes on loopback ports, and bounded waits on them: the one harness the benchmarks and the
end-to-end tests (tests/e2e) share.

It lives in bench/ (outside the product, which never imports it) and needs only the standard library and httpx,
so importing it loads none of the `bench` extra's packages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

CARE_SERVE = str(Path(sys.executable).with_name("care-serve"))
FINISHED = ("ready", "failed")

T = TypeVar("T")


def care_serve_argv() -> list[str]:
    """`care-serve` next to this interpreter (a virtualenv's script), else the module."""
    return [CARE_SERVE] if Path(CARE_SERVE).is_file() else [sys.executable, "-m", "service.cli"]


def clean_env(variables: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any CARE_ variable, offline for the hub, plus `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARE_")}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(variables)
    return env


def base_env(**care: str) -> dict[str, str]:
    """`clean_env` with one OpenMP thread, plus `care` (names without the CARE_ prefix): what the tests run."""
    return clean_env({"OMP_NUM_THREADS": "1", **{f"CARE_{name.upper()}": value for name, value in care.items()}})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    what: str, probe: Callable[[], T | None], timeout_s: float, logs: Callable[[], str], interval_s: float = 0.1
) -> T:
    """Poll `probe` until it returns something other than None (HTTP, OS and parse errors count as not yet); raise
    AssertionError naming `what`, the last error and `logs()` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as error:
            last_error, value = error, None
        if value is not None:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last error: {last_error!r})\n{logs()}")


@dataclass
class Process:
    """A process started by `start`: in its own session (so it can always be stopped), its output in `log`."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            text = []
        return f"--- {self.name} (pid {self.pid}, exit {self.popen.poll()}) ---\n" + "\n".join(text)

    def wait(self, what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.1) -> T:
        """`wait_until` that fails at once, with the log, if this process exits meanwhile."""

        def running() -> T | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited early\n{self.tail(60)}")
            return probe()

        return wait_until(what, running, timeout_s, lambda: self.tail(60), interval_s)

    def wait_ready(self, url: str, timeout_s: float = 150.0, interval_s: float = 0.1) -> None:
        """Until `url`/readyz answers 200."""

        def ready() -> bool | None:
            return True if httpx.get(f"{url}/readyz", timeout=5).status_code == 200 else None

        self.wait(f"{self.name} to be ready", ready, timeout_s, interval_s)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL to its whole session after `timeout_s`."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)  # its own session: only this process and its children
                self.popen.wait(10)


def start(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Process:
    """Start `argv` in its own session, stdout and stderr to `logs`/`name`.log."""
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return Process(name, popen, log)


def start_server(name: str, port: int, env: dict[str, str], logs: Path, *extra: str) -> Process:
    """`care-serve serve` on 127.0.0.1:`port`, waited for until /readyz answers 200."""
    process = start(name, [*care_serve_argv(), "serve", "--host", "127.0.0.1", "--port", str(port), *extra], env, logs)
    process.wait_ready(f"http://127.0.0.1:{port}")
    return process


def wait_task(
    url: str,
    task_id: str,
    logs: Callable[[], str],
    timeout_s: float,
    statuses: tuple[str, ...] = FINISHED,
    interval_s: float = 0.1,
) -> dict[str, Any]:
    """Poll GET /tasks/{task_id} until its status is one of `statuses` (default: finished); returns the record."""

    def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(f"{url}/tasks/{task_id}", timeout=10).json()
        return body if body["status"] in statuses else None

    return wait_until(f"task {task_id} to be {' or '.join(statuses)}", reached, timeout_s, logs, interval_s)


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False  # a zombie has exited; only its parent has not reaped it yet
    return True


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux; 0 elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
