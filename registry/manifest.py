"""The manifest of a version: what it contains, what it was made for, and the size and sha256 of every file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from registry.errors import CorruptArtifact, IncompatibleArtifact, UnsupportedSchema
from registry.hashing import canonical_json, config_fingerprint
from registry.paths import manifest_path, trainer_state_path, validate_relpath

__all__ = [
    "SCHEMA_VERSION",
    "FileRecord",
    "Manifest",
    "TaskRecord",
    "TrainerStateRecord",
    "check_compatible",
    "normalize_config",
    "parse_manifest",
]

SCHEMA_VERSION = 1
"""The manifest schema this build writes and the newest it reads."""

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Role = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileRecord(_Frozen):
    """Size in bytes and sha256 of one stored file."""

    size: int = Field(ge=0)
    sha256: Sha256Hex


class TaskRecord(_Frozen):
    """One task of a version. Later versions repeat the record verbatim, so its files are reused, not rewritten.

    Attributes:
        task_id: The task's stable id.
        name: Optional human-readable name.
        classes: The task's class names, in label order.
        files: Role (e.g. ``"experts"``, ``"routers"``) -> registry-relative path.
    """

    task_id: str = Field(min_length=1)
    name: str | None = None
    classes: tuple[str, ...]
    files: dict[Role, str]


class TrainerStateRecord(_Frozen):
    """Trainer-only state of a version (per-class statistics...). Servers never load it; it is not in ``files``."""

    path: str
    size: int = Field(ge=0)
    sha256: Sha256Hex


class Manifest(_Frozen):
    """The immutable description of one published version.

    Attributes:
        schema_version: Manifest schema, :data:`SCHEMA_VERSION` when written by this build.
        version: This version's number (1, 2, 3, ...).
        parent: The version it was built on (``version - 1``), None for version 1.
        created_at: When it was published (UTC).
        backbone: Name of the backbone the files belong to.
        model_cfg: The model configuration the files belong to (opaque JSON object given by the publisher).
        model_cfg_fingerprint: sha256 of the canonical JSON of ``model_cfg``.
        tasks: The tasks, in order.
        version_files: Role -> path of the files that belong to the version as a whole (classifier, shared expert).
        files: Path -> size and sha256 of every file a server may read (task and version files, nothing else).
        trainer_state: Trainer-only state; NOT for servers, and deliberately kept out of ``files``.
        extra: Free-form JSON (metrics, notes).
    """

    schema_version: int
    version: int = Field(ge=1)
    parent: int | None
    created_at: AwareDatetime
    backbone: str = Field(min_length=1)
    model_cfg: dict[str, JsonValue]
    model_cfg_fingerprint: Sha256Hex
    tasks: tuple[TaskRecord, ...]
    version_files: dict[Role, str]
    files: dict[str, FileRecord]
    trainer_state: TrainerStateRecord | None = Field(
        default=None, description="Trainer-only state: not for servers, never listed in `files`."
    )
    extra: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("created_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _check_consistency(self) -> Manifest:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {SCHEMA_VERSION}")
        expected_parent = None if self.version == 1 else self.version - 1
        if self.parent != expected_parent:
            raise ValueError(f"version {self.version} must have parent {expected_parent}, not {self.parent}")
        task_ids = [task.task_id for task in self.tasks]
        if len(set(task_ids)) != len(task_ids):
            raise ValueError(f"task ids repeat: {task_ids}")
        referenced = set(self.version_files.values())
        for task in self.tasks:
            referenced.update(task.files.values())
        for path in referenced | set(self.files):
            validate_relpath(path)
        if referenced != set(self.files):
            raise ValueError(
                f"files listed {sorted(set(self.files) - referenced)} are not referenced, "
                f"referenced {sorted(referenced - set(self.files))} are not listed"
            )
        if config_fingerprint(self.model_cfg) != self.model_cfg_fingerprint:
            raise ValueError("model_cfg_fingerprint does not match model_cfg")
        if self.trainer_state is not None and self.trainer_state.path != trainer_state_path(self.version):
            raise ValueError(f"trainer_state.path must be {trainer_state_path(self.version)!r}")
        return self

    @property
    def name(self) -> str:
        """The manifest's registry-relative path, for messages."""
        return manifest_path(self.version)

    def task(self, task_id: str) -> TaskRecord:
        """Return the record of ``task_id``.

        Raises:
            LookupError: The version has no such task.
        """
        for task in self.tasks:
            if task.task_id == task_id:
                return task
        raise LookupError(
            f"version {self.version} has no task {task_id!r}; its tasks are {[t.task_id for t in self.tasks]}"
        )

    def describe_file(self, relpath: str) -> str:
        """Say what ``relpath`` is in this version (e.g. "'experts' file of task 't1' in version 3"), for messages."""
        for role, path in self.version_files.items():
            if path == relpath:
                return f"{role!r} file of version {self.version}"
        for task in self.tasks:
            for role, path in task.files.items():
                if path == relpath:
                    return f"{role!r} file of task {task.task_id!r} in version {self.version}"
        return f"not a file of version {self.version}"

    def to_json(self) -> bytes:
        """Serialise to the JSON stored on disk."""
        return self.model_dump_json(indent=2).encode("utf-8")


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``config`` as it reads back from JSON (tuples become lists...), so fingerprints round-trip.

    Raises:
        ValueError: The mapping is not JSON-serialisable.
    """
    config_fingerprint(config)  # raises a ValueError that names the problem
    result: dict[str, Any] = json.loads(canonical_json(config))
    return result


def parse_manifest(data: bytes, *, source: str) -> Manifest:
    """Parse and validate a stored manifest.

    Args:
        data: The file's bytes.
        source: The file's registry-relative path, for messages.

    Raises:
        UnsupportedSchema: The manifest uses a schema this build cannot read.
        CorruptArtifact: The file is not a valid manifest.
    """
    restore = "the file is truncated or corrupted: restore it from backup or republish the version"
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptArtifact(f"manifest {source} is not valid JSON ({exc}); {restore}", relpath=source) from exc
    schema = raw.get("schema_version") if isinstance(raw, dict) else None
    if isinstance(schema, int) and not isinstance(schema, bool) and schema > SCHEMA_VERSION:
        raise UnsupportedSchema(
            f"manifest {source} uses schema {schema}, but this care-serve reads schemas up to {SCHEMA_VERSION}; "
            "it was written by a newer care-serve: upgrade care-serve on this machine"
        )
    if schema != SCHEMA_VERSION:
        raise UnsupportedSchema(
            f"manifest {source} has schema_version {schema!r}, expected {SCHEMA_VERSION}; it was not written by "
            "this registry format: point the registry at the right directory or republish the version"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise CorruptArtifact(f"manifest {source} is invalid: {exc}; {restore}", relpath=source) from exc


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def check_compatible(manifest: Manifest, *, backbone: str, model_config: Mapping[str, Any]) -> None:
    """Refuse a version made for another backbone or model configuration than the caller's.

    Args:
        manifest: The version to check.
        backbone: The backbone name the caller runs.
        model_config: The model configuration the caller runs.

    Raises:
        IncompatibleArtifact: Backbone or configuration differ; the message names the version, the differences and
            what to do.
    """
    if manifest.backbone != backbone:
        raise IncompatibleArtifact(
            f"registry version {manifest.version} ({manifest.name}) was made for backbone {manifest.backbone!r}, "
            f"but this process runs {backbone!r}; start the server with CARE_BACKBONE={manifest.backbone}, or point "
            f"CARE_DATA_DIR at a registry made for backbone {backbone!r}"
        )
    if config_fingerprint(model_config) == manifest.model_cfg_fingerprint:
        return
    given = normalize_config(model_config)
    keys = sorted(set(given) | set(manifest.model_cfg))
    diffs = [
        f"{key}: registry has {_short(manifest.model_cfg.get(key))}, this process has {_short(given.get(key))}"
        for key in keys
        if manifest.model_cfg.get(key, ...) != given.get(key, ...)
    ]
    raise IncompatibleArtifact(
        f"registry version {manifest.version} ({manifest.name}) was made for another model configuration of "
        f"backbone {backbone!r} (fingerprint {manifest.model_cfg_fingerprint[:12]}, this process "
        f"{config_fingerprint(model_config)[:12]}); differences: {'; '.join(diffs[:8])}. Start the server with the "
        "configuration recorded in the manifest, or point CARE_DATA_DIR at a registry made for this configuration"
    )
