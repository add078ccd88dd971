"""A PostgreSQL server on loopback for the tests: Debian's `postgresql` binaries, started in a temporary directory.

``initdb`` and ``pg_ctl`` run as an unprivileged user (PostgreSQL refuses root: as root they run through
``runuser -u postgres``, or ``nobody`` where the Debian user is missing). The server listens on 127.0.0.1 on a free
port and on a unix socket in its directory, trusts local connections as the superuser ``care``, and is stopped
(``pg_ctl stop -m immediate``) and deleted afterwards. ``fsync=off`` keeps it fast: the tests exercise concurrency
and the store's protocol, not the disk's durability (PostgreSQL's own commit durability is documented, not tested).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

SUPERUSER = "care"
_VERSION = re.compile(r"/usr/lib/postgresql/(\d+)/bin/initdb$")


def bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl (PG_BINDIR overrides), or None."""
    if override := os.environ.get("PG_BINDIR"):
        return Path(override)
    found = [(int(m.group(1)), Path(p).parent) for p in Path("/").glob("usr/lib/postgresql/*/bin/initdb")
             if (m := _VERSION.search(str(p)))]  # fmt: skip
    candidates = [d for _, d in sorted(found, reverse=True) if (d / "pg_ctl").is_file()]
    return candidates[0] if candidates else None


def missing_reason() -> str | None:
    """Why the server cannot be started here, or None."""
    if find_spec("psycopg") is None:
        return "psycopg is not installed: pip install -e '.[postgres]' (the dev extra has it)"
    if bin_dir() is None:
        return "PostgreSQL is not installed: install the Debian package `postgresql` (`make apt-deps` does)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as an unprivileged user"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """A running test server; ``database()`` makes a fresh database per test."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self._names = itertools.count()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        import psycopg

        return psycopg.connect(self.url(), autocommit=True)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new empty database, dropped (its connections ended) on exit; yields its URL."""
        name = f"care_test_{os.getpid()}_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            with self.admin() as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def postgres_server(start_timeout_s: int = 60) -> Iterator[PostgresServer]:
    """initdb + pg_ctl start in a temporary directory; stop and delete it on exit."""
    bindir = bin_dir()
    if bindir is None:
        raise RuntimeError(missing_reason())
    root = Path(tempfile.mkdtemp(prefix="care-pg-"))  # under /tmp: reachable for the unprivileged user
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = "postgres"
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            user, entry = "nobody", pwd.getpwnam("nobody")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        run_as = ["runuser", "-u", user, "--"]
    data, log = root / "data", root / "server.log"
    started = False
    try:
        subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--no-sync",
             "-E", "UTF8", "--locale=C"],
            cwd=root, check=True, capture_output=True, timeout=start_timeout_s,
        )  # fmt: skip
        for _ in range(3):  # another process may take the free port between the probe and the bind
            port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off "
                "-c full_page_writes=off -c max_connections=200"
            )
            start = subprocess.run(
                [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
                 "-t", str(start_timeout_s), "start"],
                cwd=root, capture_output=True, text=True, timeout=start_timeout_s + 10,
            )  # fmt: skip
            if start.returncode == 0:
                started = True
                break
        if not started:
            text = log.read_text() if log.is_file() else ""
            raise RuntimeError(f"PostgreSQL did not start: {start.stderr}\n{text[-2000:]}")
        yield PostgresServer(root, port)
    finally:
        if started:
            subprocess.run(
                [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                cwd=root, capture_output=True, timeout=60,
            )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
