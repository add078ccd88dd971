"""Request bytes in unnamed temporary files, read back only when asked for.

Task uploads are spooled, not held in memory: a raw archive body, a multipart `archive` part and the images
(multipart `images` parts, or the members read out of an archive) go to unnamed temporary files
(`tempfile.SpooledTemporaryFile`, in memory only up to `SPOOL_MEMORY_BYTES`) in the spool directory, and
`TaskUpload.images` reads each image back only when it is asked for. Unnamed files vanish when closed or when the
process dies, so a crash leaves nothing behind; close the upload (`TaskUpload.close`) once it is stored.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, overload

from service.ingest.limits import MiB

__all__ = ["SPOOL_MEMORY_BYTES", "Spool", "SpooledImages"]

SPOOL_MEMORY_BYTES = MiB  # a spool moves to disk beyond this


class Spool:
    """Bytes of one request in an unnamed temporary file: in memory up to SPOOL_MEMORY_BYTES, then on disk."""

    def __init__(self, directory: Path | None) -> None:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        where = None if directory is None else str(directory)
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES, dir=where)  # noqa: SIM115
        self.size = 0
        self._lock = threading.Lock()  # images are read back from worker threads

    def append(self, data: bytes) -> int:
        """Writes `data` at the end; returns its offset."""
        with self._lock:
            offset = self.size
            self.file.seek(offset)
            self.file.write(data)
            self.size += len(data)
            return offset

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            self.file.seek(offset)
            return self.file.read(size)

    def close(self) -> None:
        self.file.close()


class SpooledImages(Sequence[tuple[str, bytes]]):
    """(name, bytes) pairs kept in a spool; each image is read back only when it is indexed."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._entries: list[tuple[str, int, int]] = []

    def add(self, name: str, data: bytes) -> None:
        self._entries.append((name, self.spool.append(data), len(data)))

    def add_region(self, name: str, offset: int, size: int) -> None:
        self._entries.append((name, offset, size))

    def names(self) -> list[str]:
        return [name for name, _, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> tuple[str, bytes]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, bytes]]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, bytes] | list[tuple[str, bytes]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        name, offset, size = self._entries[index]
        return name, self.spool.read(offset, size)
