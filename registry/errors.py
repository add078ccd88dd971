"""Exceptions raised by the registry.

Every message says what was given, what was expected and what to do next, so that an operator reading a log line
(or an HTTP error body the service builds from it) can act without reading the code.
"""

from __future__ import annotations

__all__ = [
    "ArtifactExists",
    "ArtifactNotFound",
    "CorruptArtifact",
    "IncompatibleArtifact",
    "InvalidPath",
    "LockTimeout",
    "PublishConflict",
    "RegistryError",
    "TensorNotFound",
    "UnsupportedSchema",
    "VersionNotFound",
]


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class CorruptArtifact(RegistryError):
    """A stored file is missing, truncated, or its content does not match the manifest.

    Attributes:
        relpath: The registry-relative path of the offending file.
    """

    def __init__(self, message: str, *, relpath: str) -> None:
        super().__init__(message)
        self.relpath = relpath


class IncompatibleArtifact(RegistryError):
    """A version was made for another backbone or model configuration than the caller runs."""


class UnsupportedSchema(RegistryError):
    """A manifest was written with a schema this build cannot read (usually a newer care-serve)."""


class VersionNotFound(RegistryError, LookupError):
    """The requested version is not published."""


class ArtifactNotFound(RegistryError, LookupError):
    """A path is not a file of any published version."""


class TensorNotFound(RegistryError, LookupError):
    """Requested tensor keys are not in a file."""


class PublishConflict(RegistryError):
    """The caller's expected parent version is not the current version (someone else published first).

    Attributes:
        expected: The parent version the caller built on.
        current: The version that is current in the registry.
    """

    def __init__(self, message: str, *, expected: int | None, current: int | None) -> None:
        super().__init__(message)
        self.expected = expected
        self.current = current


class ArtifactExists(RegistryError):
    """A publish would overwrite a published file with different content (published files are immutable)."""


class InvalidPath(RegistryError, ValueError):
    """A relative path given by the caller is not allowed in the registry."""


class LockTimeout(RegistryError):
    """The registry's publish lock could not be taken in time."""
