"""Storage backends: where the registry's bytes live.

The registry only talks to the small :class:`StorageBackend` interface: the local directory here (an ``flock``
serialises publishers) and S3-compatible object storage in :mod:`registry.s3` (a conditional put decides between
publishers). How a version becomes visible is the backend's :meth:`StorageBackend.commit_version`, so each backend
uses its own way to let exactly one of two concurrent publishers win.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from registry.errors import LockTimeout
from registry.owner import is_owner_tag, owner_tag, written_by_dead_local_process
from registry.paths import CURRENT_FILE, LOCK_FILE, validate_relpath

__all__ = ["FileStat", "LocalDirectoryBackend", "PrepareCommit", "StagedFile", "StorageBackend", "is_temp_name"]

logger = logging.getLogger(__name__)

_LOCK_POLL_S = 0.01
# Staged files are ".<final name>.<owner tag>.<uuid4 hex>.tmp" beside their final name (LocalDirectoryBackend.stage);
# the owner tag (registry/owner.py) lets a restart remove a dead writer's files at once.
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of the backend's staged (not yet published) temporary files."""
    return _TEMP_NAME.fullmatch(name) is not None


def temp_owner(name: str) -> str | None:
    """The owner tag in a staged file's name (``.<final>.<tag>.<hex>.tmp``); None for names without one."""
    if not is_temp_name(name):
        return None
    parts = name.removesuffix(".tmp").rsplit(".", 2)
    return parts[1] if len(parts) == 3 and is_owner_tag(parts[1]) else None


@dataclass(frozen=True)
class FileStat:
    """Size and modification time of a stored file."""

    size: int
    mtime_ns: int


@dataclass(frozen=True)
class StagedFile:
    """A fully written, fsynced file that is not visible under its final name yet.

    Attributes:
        relpath: The name it will be published under.
        temp_path: Where its bytes are now (a dot file in the final directory).
    """

    relpath: str
    temp_path: Path


PrepareCommit = Callable[[], Sequence[StagedFile]]
"""Checks a publish at the backend's decision point and returns the staged files to publish (see commit_version)."""


@runtime_checkable
class StorageBackend(Protocol):
    """What the registry needs from a store of files."""

    def read_bytes(self, relpath: str) -> bytes:
        """Return a file's content; raise FileNotFoundError when it does not exist."""
        ...

    def stat(self, relpath: str) -> FileStat | None:
        """Return a file's size and mtime, or None when it does not exist."""
        ...

    def local_path(self, relpath: str) -> Path:
        """Return a local path to the file, for memory-mapping and hashing."""
        ...

    def list_dir(self, directory: str) -> list[str]:
        """Return the relative paths of the published (non-hidden) files directly inside ``directory``."""
        ...

    def stage(self, relpath: str, write: Callable[[Path], object]) -> StagedFile:
        """Have ``write`` fill a temporary file beside ``relpath``, make it durable, and return it unpublished."""
        ...

    def discard(self, staged: StagedFile) -> None:
        """Remove a staged file that will not be published."""
        ...

    def commit_version(self, version: int, *, prepare: PrepareCommit, manifest: StagedFile, timeout_s: float) -> None:
        """Make ``version`` visible: its files, then its ``manifest``, then ``CURRENT`` = ``version``, last.

        ``prepare`` checks that the parent (``version - 1``) is still current and that no published file would change
        (raising PublishConflict or ArtifactExists), and returns the staged files to publish. The backend runs it
        where its decision between concurrent publishers of ``version`` is still to come: under the local lock, or
        before the conditional write that claims the version in an object store. Of two publishers of the same
        version exactly one returns; the other raises PublishConflict, and no reader ever sees a partial version.

        Raises:
            PublishConflict: Another publisher published (or claimed) ``version`` first.
            LockTimeout: The backend could not get its turn within ``timeout_s`` seconds.
        """
        ...


_PUBLISHED_MODE = 0o644


def _current_umask() -> int:
    # Read, not set-and-restore: os.umask() would briefly change it for every thread of the process.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDirectoryBackend:
    """A registry stored in a local (or POSIX network) directory.

    Writes follow temp file -> flush + fsync -> ``os.replace`` -> fsync of the directory, so after a crash a name
    holds either its old content or its complete new content. The lock is an ``fcntl.flock`` on ``<root>/.lock``.

    Args:
        root: The registry directory; created (with parents) when missing.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalDirectoryBackend({str(self.root)!r})"

    def _resolve(self, relpath: str) -> Path:
        return self.root / validate_relpath(relpath, allow_reserved=True)

    def read_bytes(self, relpath: str) -> bytes:
        """Return a file's content; raise FileNotFoundError when it does not exist."""
        return self._resolve(relpath).read_bytes()

    def stat(self, relpath: str) -> FileStat | None:
        """Return a file's size and mtime, or None when it does not exist."""
        try:
            st = os.stat(self._resolve(relpath))
        except FileNotFoundError:
            return None
        return FileStat(size=st.st_size, mtime_ns=st.st_mtime_ns)

    def local_path(self, relpath: str) -> Path:
        """Return the file's path on this machine."""
        return self._resolve(relpath)

    def list_dir(self, directory: str) -> list[str]:
        """Return the relative paths of the non-hidden regular files directly inside ``directory``, sorted."""
        path = self._resolve(directory)
        try:
            entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        except FileNotFoundError:
            return []
        return [f"{directory}/{e.name}" for e in entries if not e.name.startswith(".") and e.is_file()]

    def _make_dirs(self, directory: Path) -> None:
        # Create missing directories one level at a time and fsync each parent, so the new directory entries
        # survive a crash together with the files published inside them.
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                path.mkdir()
            _fsync_dir(path.parent)

    def stage(self, relpath: str, write: Callable[[Path], object]) -> StagedFile:
        """Have ``write`` fill a temporary dot file beside ``relpath``, fsync it, and return it unpublished.

        Raises:
            Exception: Whatever ``write`` raises; the temporary file is removed first.
        """
        final = self._resolve(relpath)
        self._make_dirs(final.parent)
        temp = final.parent / f".{final.name}.{owner_tag()}.{uuid.uuid4().hex}.tmp"
        try:
            write(temp)
            # Published files are read by servers that may run as other users; some writers (safetensors'
            # save_file) create 0600 files. Readable by all, as the umask allows, like the manifests.
            os.chmod(temp, _PUBLISHED_MODE & ~_current_umask())
            # The writer may have closed the file without fsync (safetensors does); reopen to make it durable.
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return StagedFile(relpath=relpath, temp_path=temp)

    def commit(self, staged: StagedFile) -> None:
        """Rename a staged file onto its final name and fsync the directory."""
        final = self._resolve(staged.relpath)
        os.replace(staged.temp_path, final)
        _fsync_dir(final.parent)

    def discard(self, staged: StagedFile) -> None:
        """Remove a staged file (no error when it is already gone)."""
        staged.temp_path.unlink(missing_ok=True)

    def commit_version(self, version: int, *, prepare: PrepareCommit, manifest: StagedFile, timeout_s: float) -> None:
        """Under :meth:`lock`: run ``prepare``, rename its files into place, then the manifest, then ``CURRENT``.

        Each rename is atomic and durable; ``CURRENT`` moves last, so a crash anywhere before leaves the old version
        current (files already renamed are unreferenced, and a retry overwrites them).
        """
        with self.lock(timeout_s):
            for staged in prepare():
                self.commit(staged)
            self.commit(manifest)
            pointer = self.stage(CURRENT_FILE, lambda path: path.write_text(f"{version}\n", "ascii"))
            try:
                self.commit(pointer)
            except BaseException:
                self.discard(pointer)
                raise

    def temp_files(self) -> list[tuple[Path, float]]:
        """Staged files anywhere under the root (left by a crashed publisher, or being written now) and their mtimes."""
        found: list[tuple[Path, float]] = []
        for directory, _, names in os.walk(self.root):
            for name in names:
                if is_temp_name(name):
                    path = Path(directory) / name
                    with contextlib.suppress(FileNotFoundError):  # committed or discarded meanwhile
                        found.append((path, path.lstat().st_mtime))
        return found

    def sweep_temp_files(self, older_than_s: float) -> list[Path]:
        """Remove staged files left by publishers that died: at once when their writer was a process of this host
        and pid namespace that no longer runs (the name says which), otherwise once unchanged for ``older_than_s``.

        A live publisher stages its files, then waits at most its lock timeout before renaming them, so keep
        ``older_than_s`` well above that (minutes): a younger temp file may belong to a publish in progress.

        Returns:
            The removed files.
        """
        now = time.time()
        removed = []
        for path, mtime in self.temp_files():
            if now - mtime >= older_than_s or written_by_dead_local_process(temp_owner(path.name)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
        if removed:
            logger.info("removed %d stale temporary file(s) under %s", len(removed), self.root)
        return removed

    @contextlib.contextmanager
    def lock(self, timeout_s: float) -> Iterator[None]:
        """Hold an exclusive ``flock`` on ``<root>/.lock`` for the ``with`` block.

        Each call opens its own file description, so the lock also excludes other threads and other
        :class:`LocalDirectoryBackend` instances of the same process, not only other processes.

        Raises:
            LockTimeout: Another publisher held the lock for more than ``timeout_s`` seconds.
        """
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"could not take the publish lock {self.root / LOCK_FILE} within {timeout_s:g}s: another "
                        "publisher holds it; wait for it to finish, or stop the stuck process that holds it"
                    )
                time.sleep(_LOCK_POLL_S)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
