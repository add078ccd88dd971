"""care-serve registry: immutable, numbered versions of safetensors files described by JSON manifests.

Generic on purpose: it stores tensors and manifests and knows nothing of the model or the HTTP service.
``RegistryReader`` is the read side (current version, manifests, records, verification, tensor reads);
``Registry`` is a ``RegistryReader`` that also publishes. Publishing builds on reading, never the reverse.
"""

from registry.backend import FileStat, LocalDirectoryBackend, StagedFile, StorageBackend
from registry.errors import (
    ArtifactExists,
    ArtifactNotFound,
    CorruptArtifact,
    IncompatibleArtifact,
    InvalidPath,
    LockTimeout,
    PublishConflict,
    RegistryError,
    TensorNotFound,
    UnsupportedSchema,
    VersionNotFound,
)
from registry.hashing import HashCache, config_fingerprint, sha256_file
from registry.manifest import (
    SCHEMA_VERSION,
    FileRecord,
    Manifest,
    TaskRecord,
    TrainerStateRecord,
    check_compatible,
    parse_manifest,
)
from registry.paths import task_file_path, validate_relpath, version_file_path
from registry.reader import RegistryReader
from registry.store import Registry
from registry.tensors import KeySelection, TensorFile
from registry.watch import VersionSource, VersionWatcher

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactExists",
    "ArtifactNotFound",
    "CorruptArtifact",
    "FileRecord",
    "FileStat",
    "HashCache",
    "IncompatibleArtifact",
    "InvalidPath",
    "KeySelection",
    "LocalDirectoryBackend",
    "LockTimeout",
    "Manifest",
    "PublishConflict",
    "Registry",
    "RegistryError",
    "RegistryReader",
    "StagedFile",
    "StorageBackend",
    "TaskRecord",
    "TensorFile",
    "TensorNotFound",
    "TrainerStateRecord",
    "UnsupportedSchema",
    "VersionNotFound",
    "VersionSource",
    "VersionWatcher",
    "check_compatible",
    "config_fingerprint",
    "parse_manifest",
    "sha256_file",
    "task_file_path",
    "validate_relpath",
    "version_file_path",
]
