"""Which process wrote a temporary file: owner tags in file names, so a restart can tell crash leftovers at once.

A tag is ``<host hash><pid namespace>p<pid>``. A file whose tag names this host and pid namespace and a pid that
no longer runs was left by a process that died: it can be removed at once, whatever its age. Any other tag (another
host or container sharing the directory, or a pid that runs) can only be judged by age, as before.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket

_TAG = re.compile(r"([0-9a-f]{8})([0-9a-f]+)p([0-9]+)")


def pid_namespace() -> int:
    """The inode of this process's pid namespace (0 where /proc does not say): processes with the same one, on
    the same host, see each other's pids."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _local_prefix() -> str:
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}{pid_namespace():x}"


def owner_tag() -> str:
    """This process's tag, safe in file names (lower-case hex, ``p`` and digits)."""
    return f"{_local_prefix()}p{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process of this pid namespace runs (a pid we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def written_by_dead_local_process(tag: str | None) -> bool:
    """Whether ``tag`` names a process of this host and pid namespace that is no longer running."""
    if tag is None:
        return False
    match = _TAG.fullmatch(tag)
    if match is None or match.group(1) + match.group(2) != _local_prefix():
        return False
    pid = int(match.group(3))
    return pid != os.getpid() and not process_alive(pid)


def is_owner_tag(text: str) -> bool:
    return _TAG.fullmatch(text) is not None
