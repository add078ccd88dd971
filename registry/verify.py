"""A full check of a stored registry: ``CURRENT``, every published manifest, and every file's size and sha256.

Unlike :meth:`Registry.verify` (one version, stops at the first bad file, served from the hash cache), this reads
every byte of every file of every published version once and reports *all* problems, each naming its file. It is
what ``care-serve registry verify`` runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from registry.backend import StorageBackend
from registry.errors import RegistryError
from registry.hashing import HashCache
from registry.integrity import verify_file
from registry.manifest import FileRecord, Manifest, parse_manifest
from registry.paths import CURRENT_FILE, MANIFEST_DIR, manifest_path

__all__ = ["Problem", "VerifyReport", "verify_registry"]

_VERSION_TEXT = re.compile(r"[1-9][0-9]*")
_MANIFEST_NAME = re.compile(r"([0-9]{6,})\.json")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the registry.

    Attributes:
        relpath: The registry-relative file it concerns.
        message: What is wrong and what to do.
    """

    relpath: str
    message: str


@dataclass
class VerifyReport:
    """What :func:`verify_registry` checked and found.

    Attributes:
        current: The version ``CURRENT`` names (None when it is missing or unreadable).
        versions: Manifests checked.
        files: Distinct files whose size and sha256 were checked (trainer state included).
        bytes: Their total recorded size.
        problems: Everything that does not match; empty means the registry is intact.
        notes: Harmless findings (leftovers of a publish that died before moving ``CURRENT``).
    """

    current: int | None = None
    versions: int = 0
    files: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _manifest_versions(backend: StorageBackend) -> list[int]:
    versions = []
    for relpath in backend.list_dir(MANIFEST_DIR):
        match = _MANIFEST_NAME.fullmatch(relpath.rsplit("/", 1)[-1])
        if match:
            versions.append(int(match.group(1)))
    return sorted(versions)


def _read_current(backend: StorageBackend, report: VerifyReport, stored: list[int]) -> int | None:
    try:
        text = backend.read_bytes(CURRENT_FILE).decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        if stored:
            report.problems.append(
                Problem(
                    CURRENT_FILE,
                    f"{CURRENT_FILE} is missing but {len(stored)} manifest(s) exist (highest {stored[-1]}); write the "
                    f"highest intact version into {CURRENT_FILE}",
                )
            )
        return None
    if not _VERSION_TEXT.fullmatch(text):
        report.problems.append(
            Problem(CURRENT_FILE, f"{CURRENT_FILE} holds {text[:20]!r}, not a version number; restore it from backup")
        )
        return None
    return int(text)


def _load_manifest(backend: StorageBackend, version: int, current: int, report: VerifyReport) -> Manifest | None:
    relpath = manifest_path(version)
    try:
        data = backend.read_bytes(relpath)
    except FileNotFoundError:
        pointer = f"{CURRENT_FILE} points at version {current}" if version == current else f"version {version}"
        report.problems.append(
            Problem(relpath, f"{pointer} but its manifest {relpath} is missing; restore it from backup")
        )
        return None
    except RegistryError as exc:  # an object store's copy that fails its own checksum
        report.problems.append(Problem(relpath, str(exc)))
        return None
    try:
        manifest = parse_manifest(data, source=relpath)
    except RegistryError as exc:
        report.problems.append(Problem(relpath, str(exc)))
        return None
    if manifest.version != version:
        report.problems.append(
            Problem(relpath, f"{relpath} says it is version {manifest.version}; restore it from backup")
        )
        return None
    return manifest


def verify_registry(backend: StorageBackend) -> VerifyReport:
    """Check ``CURRENT``, every manifest up to it, and every file they list (size, then a full sha256).

    A file shared by several versions is hashed once; two manifests that record different sizes or hashes for
    the same path are a problem. Manifests above ``CURRENT`` are reported as notes, not problems: a publish that
    dies before moving the pointer leaves one, and no reader ever uses it.

    Args:
        backend: The registry's storage.

    Returns:
        The report; ``report.ok`` is False when anything does not match.
    """
    report = VerifyReport()
    stored = _manifest_versions(backend)
    current = _read_current(backend, report, stored)
    report.current = current
    if current is None:
        return report
    cache = HashCache()  # private: every file is read in full
    checked: dict[str, tuple[FileRecord, int]] = {}
    for version in range(1, current + 1):
        manifest = _load_manifest(backend, version, current, report)
        if manifest is None:
            continue
        report.versions += 1
        files: list[tuple[str, FileRecord, str]] = [
            (path, record, manifest.describe_file(path)) for path, record in sorted(manifest.files.items())
        ]
        if manifest.trainer_state is not None:
            state = manifest.trainer_state
            files.append(
                (state.path, FileRecord(size=state.size, sha256=state.sha256), f"trainer state of version {version}")
            )
        for relpath, record, what in files:
            seen = checked.get(relpath)
            if seen is not None:
                if seen[0] != record:
                    report.problems.append(
                        Problem(
                            relpath,
                            f"{relpath} is recorded as {record.size} bytes sha256 {record.sha256} in version {version} "
                            f"but as {seen[0].size} bytes sha256 {seen[0].sha256} in version {seen[1]}",
                        )
                    )
                continue
            checked[relpath] = (record, version)
            report.files += 1
            report.bytes += record.size
            try:
                verify_file(backend, cache, relpath, record, f"{what}, version {version}")
            except RegistryError as exc:
                report.problems.append(Problem(relpath, str(exc)))
    above = [v for v in stored if v > current]
    if above:
        report.notes.append(
            f"manifest(s) {', '.join(manifest_path(v) for v in above)} lie above {CURRENT_FILE} ({current}): left by "
            "a publish that stopped before moving the pointer; servers never read them"
        )
    return report
