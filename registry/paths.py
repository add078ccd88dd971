"""The registry's on-disk layout and the validation of caller-chosen relative paths.

Layout under the registry root::

    CURRENT                              the published version number (moved last, atomically)
    .lock                                flock target that serialises publishers
    manifests/000007.json                one immutable manifest per version
    trainer/000007.safetensors           trainer-only state of version 7 (servers never read it)
    tasks/0007-<task_id>/<role>.safetensors      caller files (suggested names), written once, reused
    versions/000007/<role>.safetensors           caller files that change every version (classifier, ...)
"""

from __future__ import annotations

import re

from registry.errors import InvalidPath

__all__ = [
    "CURRENT_FILE",
    "LOCK_FILE",
    "MANIFEST_DIR",
    "TRAINER_DIR",
    "manifest_path",
    "task_file_path",
    "trainer_state_path",
    "validate_relpath",
    "version_file_path",
]

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
MANIFEST_DIR = "manifests"
TRAINER_DIR = "trainer"

# Names the registry writes itself; caller files may not live there, so a caller can never shadow a manifest.
_RESERVED_TOP_LEVEL = frozenset({CURRENT_FILE, LOCK_FILE, MANIFEST_DIR, TRAINER_DIR})
_PATH_CHARS = re.compile(r"[A-Za-z0-9._/-]+")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_MAX_PATH_LEN = 512


def validate_relpath(relpath: str, *, allow_reserved: bool = False) -> str:
    """Check that a registry-relative path is safe and return it unchanged.

    A valid path uses only ``[A-Za-z0-9._/-]``, is relative, has no empty, ``.`` or ``..`` segment and no segment that
    starts with a dot (temporary files are dot files, so a published name can never collide with one).

    Args:
        relpath: The path to check, with ``/`` separators.
        allow_reserved: Accept the registry's own names (``CURRENT``, ``manifests/...``, ``trainer/...``). Only the
            registry itself passes True.

    Returns:
        The same path.

    Raises:
        InvalidPath: The path breaks one of the rules; the message says which.
    """
    if not isinstance(relpath, str) or not relpath:
        raise InvalidPath(f"registry path {relpath!r} is empty or not a string; give a relative path like 'tasks/x.st'")
    if len(relpath) > _MAX_PATH_LEN:
        raise InvalidPath(
            f"registry path {relpath[:40]!r}... is {len(relpath)} characters; use at most {_MAX_PATH_LEN}"
        )
    if not _PATH_CHARS.fullmatch(relpath):
        raise InvalidPath(
            f"registry path {relpath!r} contains characters outside [A-Za-z0-9._/-]; "
            "build it with task_file_path() or version_file_path()"
        )
    if relpath.startswith("/"):
        raise InvalidPath(f"registry path {relpath!r} is absolute; give a path relative to the registry root")
    segments = relpath.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise InvalidPath(f"registry path {relpath!r} has an empty, '.' or '..' segment; remove it")
        if segment.startswith("."):
            raise InvalidPath(
                f"registry path {relpath!r} has a segment starting with '.', reserved for temporary files"
            )
    if not allow_reserved and segments[0] in _RESERVED_TOP_LEVEL:
        raise InvalidPath(
            f"registry path {relpath!r} is inside the registry's own namespace {segments[0]!r}; "
            "put caller files under another directory, e.g. 'tasks/' or 'versions/'"
        )
    return relpath


def _check_name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value):
        raise InvalidPath(f"{what} {value!r} must match [A-Za-z0-9_-][A-Za-z0-9._-]* to be used in a file name")
    return value


def _check_index(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidPath(f"{what} must be a non-negative integer, got {value!r}")
    return value


def task_file_path(index: int, task_id: str, role: str) -> str:
    """Canonical relative path of a task's file, written once and reused by every later version.

    Args:
        index: The task's position in the lineage (1 for the first task).
        task_id: The task's id; must be usable in a file name.
        role: What the file holds, e.g. ``"experts"`` or ``"routers"``.

    Returns:
        A path like ``"tasks/0007-t-ab12cd/experts.safetensors"``.
    """
    _check_index(index, "task index")
    return f"tasks/{index:04d}-{_check_name(task_id, 'task id')}/{_check_name(role, 'file role')}.safetensors"


def version_file_path(version: int, role: str) -> str:
    """Canonical relative path of a file that belongs to one version (e.g. the classifier as of that version).

    Args:
        version: The version the file is published with.
        role: What the file holds, e.g. ``"classifier"`` or ``"shared"``.

    Returns:
        A path like ``"versions/000007/classifier.safetensors"``.
    """
    _check_index(version, "version")
    return f"versions/{version:06d}/{_check_name(role, 'file role')}.safetensors"


def manifest_path(version: int) -> str:
    """Relative path of the manifest of ``version``."""
    return f"{MANIFEST_DIR}/{version:06d}.json"


def trainer_state_path(version: int) -> str:
    """Relative path of the trainer-only state of ``version``."""
    return f"{TRAINER_DIR}/{version:06d}.safetensors"
