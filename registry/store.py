"""The :class:`Registry`: a :class:`RegistryReader` that also publishes new versions.

The layering runs one way: ``store`` -> ``publish`` -> ``reader``. Everything that reads (current version, manifests,
records, verification, tensor reads) is in :mod:`registry.reader`; the publish transaction is in
:mod:`registry.publish`; this module only puts the two together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Self

import torch

from registry.backend import LocalDirectoryBackend, StorageBackend
from registry.hashing import HashCache
from registry.manifest import Manifest, TaskRecord
from registry.publish import publish_version
from registry.reader import RegistryReader
from registry.tensors import TensorFile

__all__ = ["Registry"]


class Registry(RegistryReader):
    """Immutable, numbered versions of safetensors files plus one JSON manifest per version: read and publish.

    Reads are those of :class:`RegistryReader` (they never lock); :meth:`publish` adds a version. Instances are safe to
    share between threads.

    Args:
        backend: Where the bytes live.
        hash_cache: Cache of verified file hashes; a private one is made when None.
        lock_timeout_s: How long :meth:`publish` waits for a concurrent publisher.
    """

    def __init__(
        self, backend: StorageBackend, *, hash_cache: HashCache | None = None, lock_timeout_s: float = 60.0
    ) -> None:
        super().__init__(backend, hash_cache=hash_cache)
        self.lock_timeout_s = lock_timeout_s

    @classmethod
    def from_path(
        cls, root: str | os.PathLike[str], *, hash_cache: HashCache | None = None, lock_timeout_s: float = 60.0
    ) -> Self:
        """A registry in the local directory ``root`` (created when missing), with the constructor's options."""
        return cls(LocalDirectoryBackend(root), hash_cache=hash_cache, lock_timeout_s=lock_timeout_s)

    def publish(
        self,
        *,
        parent: int | None,
        backbone: str,
        model_config: Mapping[str, Any],
        tasks: Sequence[TaskRecord],
        new_files: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str]]],
        version_files: Mapping[str, str] | None = None,
        trainer_state: TensorFile | Mapping[str, torch.Tensor] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Publish version ``(parent or 0) + 1``: new files first, then the manifest, then the pointer, atomically.

        Safe against concurrent publishers in other processes: under an exclusive lock, the publish is refused unless
        ``parent`` is still the current version (compare-and-swap). Published files are never rewritten.

        Args:
            parent: The version the caller built on (its expected current version); None for the first version.
            backbone: Backbone name the files belong to; must equal the parent's.
            model_config: JSON-serialisable model configuration the files belong to; must equal the parent's.
            tasks: The full ordered task list of the new version: the parent's records verbatim (their files are
                reused) plus the new ones.
            new_files: Relative path -> ``(tensors, header metadata)`` (e.g. a :class:`TensorFile`) for each file this
                version adds. Each must be referenced by a task or by ``version_files``; every referenced path not
                listed here must be a file of the parent. Tensors are saved from a private CPU copy.
            version_files: Role -> relative path of the files of the version as a whole (e.g. ``"classifier"``).
            trainer_state: Trainer-only tensors (or a :class:`TensorFile` with metadata), stored as
                ``trainer/<version>.safetensors`` outside the server files; read back with load_trainer_state().
            extra: Free-form JSON recorded in the manifest (metrics...).

        Returns:
            The new version's manifest.

        Raises:
            PublishConflict: ``parent`` is not the current version; reload and rebuild on the latest manifest.
            ArtifactExists: A new file's path is already published with different content.
            IncompatibleArtifact: Backbone or configuration differ from the parent's.
            InvalidPath: A relative path breaks the path rules.
            ValueError: The arguments are inconsistent (unreferenced new file, unknown reused path...).
            LockTimeout: Another publisher held the lock longer than ``lock_timeout_s``.
        """
        manifest = publish_version(
            self,
            lock_timeout_s=self.lock_timeout_s,
            parent=parent,
            backbone=backbone,
            model_config=model_config,
            tasks=tasks,
            new_files=new_files,
            version_files=version_files or {},
            trainer_state=trainer_state,
            extra=extra or {},
        )
        self._remember(manifest)
        return manifest
