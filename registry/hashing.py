"""Content hashes: file sha256 with a stat-keyed cache, and the fingerprint of a model configuration."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["HashCache", "canonical_json", "config_fingerprint", "sha256_file"]

_CHUNK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(value: Mapping[str, Any]) -> str:
    """The canonical JSON text of a mapping: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """Fingerprint of a model configuration: sha256 of its canonical JSON.

    Args:
        config: A JSON-serialisable mapping.

    Returns:
        The hex sha256 of ``json.dumps(config, sort_keys=True, separators=(",", ":"))``.

    Raises:
        ValueError: The mapping is not JSON-serialisable.
    """
    try:
        text = canonical_json(config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the model configuration is not JSON-serialisable ({exc}); pass plain JSON values") from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_StatKey = tuple[int, int, int, int, int]


def _stat_key(st: os.stat_result) -> _StatKey:
    # ctime cannot be set back by utime(), and the inode changes on os.replace, so together with size and mtime
    # they notice every ordinary way a file can change.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class HashCache:
    """Thread-safe cache of file sha256s keyed by ``(path, size, mtime_ns, ...)``.

    Re-verifying an unchanged file (the same task files appear in every version) costs one ``stat``.

    File timestamps tick coarsely (a few ms on Linux, seconds on some network file systems), so a file changed in
    the same tick as it was hashed would keep its stat key. Like git's "racily clean" rule, a hash is cached only
    when the file's last change is older than ``racy_window_s`` before hashing started; a fresh file is simply hashed
    again next time.

    Args:
        racy_window_s: How old a file's last change must be for its hash to be cached.
    """

    def __init__(self, racy_window_s: float = 2.0) -> None:
        if racy_window_s < 0:
            raise ValueError(f"racy_window_s must be >= 0, got {racy_window_s}")
        self._racy_window_ns = int(racy_window_s * 1e9)
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[_StatKey, str]] = {}
        self.hits = 0
        self.misses = 0

    def sha256(self, path: Path) -> str:
        """Return the sha256 of ``path``, from the cache when the file is unchanged.

        Raises:
            OSError: The file cannot be read.
        """
        name = str(path)
        before = _stat_key(os.stat(path))
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry[0] == before:
                self.hits += 1
                return entry[1]
            self.misses += 1
        started_ns = time.time_ns()
        digest = sha256_file(path)
        after = _stat_key(os.stat(path))
        last_change_ns = max(after[3], after[4])
        if after == before and last_change_ns < started_ns - self._racy_window_ns:
            with self._lock:
                self._entries[name] = (after, digest)
        return digest

    def forget(self, path: Path) -> None:
        """Drop the cached hash of ``path`` (no error when there is none)."""
        with self._lock:
            self._entries.pop(str(path), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
