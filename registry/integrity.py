"""Comparing stored files with the size and sha256 their manifest records, with errors that name the file."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from safetensors import SafetensorError

from registry.backend import StorageBackend
from registry.errors import CorruptArtifact
from registry.hashing import HashCache
from registry.manifest import FileRecord

__all__ = ["check_size", "unreadable_as_corrupt", "verify_file"]

RESTORE_ADVICE = "the file is truncated or corrupted: restore it from backup or republish the task"


def check_size(backend: StorageBackend, relpath: str, record: FileRecord, what: str) -> None:
    """Compare a file's size with its record (one ``stat``).

    Args:
        backend: Where the file lives.
        relpath: The file's registry-relative path.
        record: What the manifest records for it.
        what: What the file is, for the message (e.g. "'experts' file of task 't1' in version 3").

    Raises:
        CorruptArtifact: The file is missing or has another size.
    """
    stat = backend.stat(relpath)
    if stat is None:
        raise CorruptArtifact(
            f"{relpath} ({what}) is missing; restore it from backup or republish the task", relpath=relpath
        )
    if stat.size != record.size:
        raise CorruptArtifact(
            f"{relpath} ({what}) has {stat.size} bytes but its manifest records {record.size}; {RESTORE_ADVICE}",
            relpath=relpath,
        )


def verify_file(backend: StorageBackend, cache: HashCache, relpath: str, record: FileRecord, what: str) -> None:
    """Compare a file's size and sha256 with its record; the hash comes from ``cache`` when the file is unchanged.

    Raises:
        CorruptArtifact: The file is missing, unreadable, or differs from its record.
    """
    check_size(backend, relpath, record, what)
    try:
        digest = cache.sha256(backend.local_path(relpath))
    except OSError as exc:
        raise CorruptArtifact(
            f"{relpath} ({what}) cannot be read ({exc}); check its permissions or restore it from backup",
            relpath=relpath,
        ) from exc
    if digest != record.sha256:
        raise CorruptArtifact(
            f"{relpath} ({what}) has sha256 {digest} but its manifest records {record.sha256}; {RESTORE_ADVICE}",
            relpath=relpath,
        )


@contextlib.contextmanager
def unreadable_as_corrupt(relpath: str, what: str) -> Iterator[None]:
    """Turn a safetensors or OS error raised while reading ``relpath`` into a CorruptArtifact that names it."""
    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise CorruptArtifact(
            f"{relpath} ({what}) cannot be read as safetensors ({exc}); {RESTORE_ADVICE}", relpath=relpath
        ) from exc
