"""Process harness for end-to-end tests: real `care-serve` processes on loopback ports, bounded waits."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

CARE_SERVE = str(Path(sys.executable).with_name("care-serve"))

T = TypeVar("T")


def base_env(**care: str) -> dict[str, str]:
    """This process's environment without any CARE_ variable, plus `care` (names without the CARE_ prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARE_")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env.update({f"CARE_{name.upper()}": value for name, value in care.items()})
    return env


@dataclass
class Process:
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

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)  # its own session: only this process and its children
                self.popen.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Process:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return Process(name, popen, log)


def wait_until(what: str, probe: Callable[[], T | None], timeout_s: float, logs: Callable[[], str]) -> T:
    """Poll `probe` until it returns something other than None (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as error:
            last_error, value = error, None
        if value is not None:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last error: {last_error!r})\n{logs()}")


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


def start_server(name: str, port: int, env: dict[str, str], logs: Path, *extra: str) -> Process:
    """`care-serve serve` on 127.0.0.1:`port`, waited for until /readyz answers 200."""
    process = start(name, [CARE_SERVE, "serve", "--host", "127.0.0.1", "--port", str(port), *extra], env, logs)

    def ready() -> bool | None:
        if process.popen.poll() is not None:
            raise AssertionError(f"{name} exited early\n{process.tail(60)}")
        return True if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200 else None

    wait_until(f"{name} to be ready", ready, 150, lambda: process.tail(60))
    return process
