"""The read side of a registry: the current version, manifests, file records, verification and tensor reads.

It knows nothing of publishing: ``registry.publish`` builds on it, and :class:`registry.Registry` adds ``publish()`` to
it (import-linter contracts in pyproject.toml keep the direction).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable
from typing import Self

import torch
from safetensors.torch import load as safetensors_load

from registry.backend import LocalDirectoryBackend, StorageBackend
from registry.errors import ArtifactNotFound, CorruptArtifact, VersionNotFound
from registry.hashing import HashCache
from registry.integrity import check_size, unreadable_as_corrupt, verify_file
from registry.manifest import FileRecord, Manifest, parse_manifest
from registry.paths import CURRENT_FILE, MANIFEST_DIR, manifest_path
from registry.tensors import KeySelection, TensorFile, read_header_metadata, read_tensors

__all__ = ["RegistryReader"]

logger = logging.getLogger(__name__)

_VERSION_TEXT = re.compile(r"[1-9][0-9]*")
_MANIFEST_NAME = re.compile(r"([0-9]{6,})\.json")


class RegistryReader:
    """Reads immutable, numbered versions of safetensors files, each described by one JSON manifest.

    Readers never lock: a version becomes visible when the ``CURRENT`` pointer moves, which publishing does last and
    atomically, so a reader sees either the old version or the new one. Instances are safe to share between threads.

    Args:
        backend: Where the bytes live.
        hash_cache: Cache of verified file hashes; a private one is made when None.
    """

    def __init__(self, backend: StorageBackend, *, hash_cache: HashCache | None = None) -> None:
        self.backend = backend
        self.hash_cache = hash_cache if hash_cache is not None else HashCache()
        # Published files never change, so path -> record learned from any manifest stays true; it lets
        # open_tensors() take a bare path. Filled lazily, newest manifests first.
        self._index_lock = threading.Lock()
        self._records: dict[str, FileRecord] = {}
        self._indexed_versions: set[int] = set()

    @classmethod
    def from_path(cls, root: str | os.PathLike[str], *, hash_cache: HashCache | None = None) -> Self:
        """A reader of the local directory ``root`` (created when missing), with the constructor's options."""
        return cls(LocalDirectoryBackend(root), hash_cache=hash_cache)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend!r})"

    # ---- versions -------------------------------------------------------------------------------------------

    def current_version(self) -> int | None:
        """Return the published version number, or None when nothing is published. Reads one tiny file.

        Raises:
            CorruptArtifact: The pointer file does not hold a version number.
        """
        try:
            data = self.backend.read_bytes(CURRENT_FILE)
        except FileNotFoundError:
            return None
        text = data.decode("ascii", errors="replace").strip()
        if not _VERSION_TEXT.fullmatch(text):
            raise CorruptArtifact(
                f"the pointer file {CURRENT_FILE} holds {text[:20]!r}, expected a version number; restore it from "
                f"backup or write the highest version found in {MANIFEST_DIR}/ into it",
                relpath=CURRENT_FILE,
            )
        return int(text)

    def list_versions(self) -> list[int]:
        """Return the published version numbers, oldest first."""
        current = self.current_version()
        if current is None:
            return []
        versions = []
        for relpath in self.backend.list_dir(MANIFEST_DIR):
            match = _MANIFEST_NAME.fullmatch(relpath.rsplit("/", 1)[-1])
            # A manifest above CURRENT is left over from a publish that died before moving the pointer.
            if match and int(match.group(1)) <= current:
                versions.append(int(match.group(1)))
        return sorted(versions)

    def load_manifest(self, version: int) -> Manifest:
        """Read and validate the manifest of a published version (file contents are not verified; see verify()).

        Raises:
            VersionNotFound: ``version`` is not published.
            CorruptArtifact: The manifest is missing or invalid.
            UnsupportedSchema: The manifest was written by a newer care-serve.
        """
        current = self.current_version()
        if isinstance(version, bool) or not isinstance(version, int) or current is None or not 1 <= version <= current:
            raise VersionNotFound(
                f"version {version!r} is not published (current version: {current}); "
                "call list_versions() for the published ones"
            )
        relpath = manifest_path(version)
        try:
            data = self.backend.read_bytes(relpath)
        except FileNotFoundError as exc:
            raise CorruptArtifact(
                f"manifest {relpath} of published version {version} is missing (current version {current}); "
                "restore it from backup",
                relpath=relpath,
            ) from exc
        manifest = parse_manifest(data, source=relpath)
        if manifest.version != version:
            raise CorruptArtifact(
                f"manifest {relpath} says it is version {manifest.version}; restore the file from backup",
                relpath=relpath,
            )
        self._remember(manifest)
        return manifest

    def latest_manifest(self) -> Manifest | None:
        """Return the manifest of the current version, or None when nothing is published."""
        current = self.current_version()
        return None if current is None else self.load_manifest(current)

    # ---- integrity ------------------------------------------------------------------------------------------

    def _remember(self, manifest: Manifest) -> None:
        with self._index_lock:
            if manifest.version not in self._indexed_versions:
                for relpath, record in manifest.files.items():
                    self._records.setdefault(relpath, record)
                self._indexed_versions.add(manifest.version)

    def find_record(self, relpath: str) -> FileRecord | None:
        """Return the size and sha256 a published version records for ``relpath``, or None if none lists it.

        Trainer state is not a server file and is never found here.
        """
        with self._index_lock:
            record = self._records.get(relpath)
        if record is not None:
            return record
        current = self.current_version()
        for version in range(current or 0, 0, -1):
            with self._index_lock:
                known = version in self._indexed_versions
            if not known:
                record = self.load_manifest(version).files.get(relpath)
                if record is not None:
                    return record
        return None

    def _require_record(self, relpath: str) -> FileRecord:
        record = self.find_record(relpath)
        if record is None:
            raise ArtifactNotFound(
                f"{relpath!r} is not a file of any published version (current version: {self.current_version()}); "
                "use a path from a manifest's files (trainer state is read with load_trainer_state())"
            )
        return record

    def verify(self, manifest: Manifest, paths: Iterable[str] | None = None) -> None:
        """Check the size and sha256 of a version's files (all of them, or ``paths``) against its manifest.

        Unchanged files verified before (in any version) cost one ``stat`` each, thanks to the hash cache.

        Raises:
            CorruptArtifact: A file is missing, truncated or altered; the message names it.
            ArtifactNotFound: A path in ``paths`` is not a file of this version.
        """
        selected = sorted(manifest.files) if paths is None else list(paths)
        for relpath in selected:
            record = manifest.files.get(relpath)
            if record is None:
                raise ArtifactNotFound(
                    f"{relpath!r} is not a file of version {manifest.version} (it has {len(manifest.files)}, e.g. "
                    f"{sorted(manifest.files)[:3]}); pass paths from the manifest's files"
                )
            verify_file(self.backend, self.hash_cache, relpath, record, manifest.describe_file(relpath))
        logger.debug("verified %d file(s) of version %d", len(selected), manifest.version)

    # ---- reads ----------------------------------------------------------------------------------------------

    def open_tensors(
        self, relpath: str, keys: KeySelection = None, *, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Read tensors of a published file lazily (memory-mapped), after a cheap size check against its manifest.

        NOTE: on CPU the returned tensors share pages with the file's private memory map (safetensors is zero-copy),
        which is safe only because published files are never rewritten or truncated in place. Moving them to another
        device copies them.

        Args:
            relpath: A path listed in a published manifest's ``files``.
            keys: None for every tensor, a str for every key with that prefix, or an iterable of exact keys.
            device: Where to put the tensors.

        Returns:
            Key -> tensor, in file order (prefix / all) or in the order asked (exact keys).

        Raises:
            ArtifactNotFound: No published version lists ``relpath``.
            CorruptArtifact: The file is missing, has the wrong size, or is not readable safetensors.
            TensorNotFound: An exact key is not in the file.
        """
        record = self._require_record(relpath)
        check_size(self.backend, relpath, record, "published file")
        with unreadable_as_corrupt(relpath, "published file"):
            return read_tensors(self.backend.local_path(relpath), keys, device=str(device), source=relpath)

    def load_tensors(self, relpath: str) -> dict[str, torch.Tensor]:
        """Read every tensor of a published file into memory the caller owns (no memory map stays behind).

        One read and one parse: about twice as fast as ``open_tensors`` plus a copy for small files read whole and
        often (a router cache reloading evicted routers), and safe against the file being replaced later.
        """
        record = self._require_record(relpath)
        with unreadable_as_corrupt(relpath, "published file"):
            data = self.backend.read_bytes(relpath)
            if len(data) != record.size:
                raise OSError(f"read {len(data)} bytes, the manifest records {record.size}")
            return safetensors_load(data)

    def read_metadata(self, relpath: str) -> dict[str, str]:
        """Return the string metadata in a published file's safetensors header (size-checked like open_tensors)."""
        record = self._require_record(relpath)
        check_size(self.backend, relpath, record, "published file")
        with unreadable_as_corrupt(relpath, "published file"):
            return read_header_metadata(self.backend.local_path(relpath))

    def load_trainer_state(self, version: int) -> TensorFile | None:
        """Load the trainer-only state published with ``version`` (fully verified first). Servers never call this.

        Returns:
            The tensors and metadata, or None when that version was published without trainer state.

        Raises:
            VersionNotFound: ``version`` is not published.
            CorruptArtifact: The state file is missing or altered.
        """
        manifest = self.load_manifest(version)
        state = manifest.trainer_state
        if state is None:
            return None
        record = FileRecord(size=state.size, sha256=state.sha256)
        what = f"trainer state of version {version}"
        verify_file(self.backend, self.hash_cache, state.path, record, what)
        path = self.backend.local_path(state.path)
        with unreadable_as_corrupt(state.path, what):
            return TensorFile(read_tensors(path, None, device="cpu", source=state.path), read_header_metadata(path))
