"""The publish transaction: stage new files, then compare-and-swap, commit, write manifest, move pointer.

Publishing builds on the read side (:class:`registry.reader.RegistryReader`: the current version, the parent's
manifest, the records of published files); the read side never imports this module.

Order of visibility:

1. new task/version files, the trainer state and the manifest, staged *before* any decision (the slow part);
2. the backend's ``commit_version``: at its decision point (under an exclusive lock for the local directory, before
   the conditional claim of the version in an object store) check that the parent is still current
   (compare-and-swap) and refuse to overwrite a published file with different content; then publish the files;
3. the manifest;
4. ``CURRENT``, last. Until it moves nobody reads the new version. For the local directory (each step temp file ->
   fsync -> rename -> fsync directory) a crash anywhere before leaves the old version current, and files left
   behind are unreferenced and a retry overwrites them; for S3 see :mod:`registry.s3`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import torch

from registry.backend import StagedFile
from registry.errors import ArtifactExists, IncompatibleArtifact, PublishConflict
from registry.hashing import config_fingerprint, sha256_file
from registry.manifest import SCHEMA_VERSION, FileRecord, Manifest, TaskRecord, TrainerStateRecord, normalize_config
from registry.paths import trainer_state_path, validate_relpath
from registry.reader import RegistryReader
from registry.tensors import TensorFile, write_tensor_file

__all__ = ["publish_version"]

logger = logging.getLogger(__name__)


def _check_parent(parent: int | None, current: int | None) -> None:
    if parent != current:
        raise PublishConflict(
            f"cannot publish on top of version {parent}: the current version is {current} (another publisher "
            "moved it); load the latest manifest, rebuild the new version on it and publish again",
            expected=parent,
            current=current,
        )


def _check_lineage(parent: Manifest, backbone: str, fingerprint: str) -> None:
    if parent.backbone != backbone or parent.model_cfg_fingerprint != fingerprint:
        raise IncompatibleArtifact(
            f"cannot publish on top of version {parent.version}: it was made for backbone {parent.backbone!r} with "
            f"configuration {parent.model_cfg_fingerprint[:12]}, this publish is for {backbone!r} with "
            f"{fingerprint[:12]}; a lineage keeps its backbone and configuration: publish into a new registry "
            "directory instead"
        )


def _plan_reuse(
    parent: Manifest | None, tasks: Sequence[TaskRecord], new_paths: set[str], version_files: Mapping[str, str]
) -> dict[str, FileRecord]:
    """Validate every referenced path and return the records of the files reused from the parent."""
    referenced: dict[str, str] = {}
    task_ids: set[str] = set()
    for task in tasks:
        if task.task_id in task_ids:
            raise ValueError(f"task id {task.task_id!r} appears twice in the task list; give each task once")
        task_ids.add(task.task_id)
        for role, path in task.files.items():
            referenced.setdefault(validate_relpath(path), f"{role!r} file of task {task.task_id!r}")
    for role, path in version_files.items():
        referenced.setdefault(validate_relpath(path), f"version file {role!r}")
    for path in sorted(new_paths):
        validate_relpath(path)
        if path not in referenced:
            raise ValueError(
                f"new file {path!r} is not referenced by any task or version file; reference it or drop it"
            )
    reused: dict[str, FileRecord] = {}
    for path, what in referenced.items():
        if path in new_paths:
            continue
        record = parent.files.get(path) if parent is not None else None
        if record is None:
            raise ValueError(
                f"{path!r} ({what}) is neither in new_files nor a file of parent version "
                f"{parent.version if parent else None}; pass its tensors in new_files or reuse the parent's task record"
            )
        reused[path] = record
    return reused


def _record_of(staged: StagedFile) -> FileRecord:
    return FileRecord(size=os.stat(staged.temp_path).st_size, sha256=sha256_file(staged.temp_path))


def publish_version(
    reader: RegistryReader,
    *,
    lock_timeout_s: float,
    parent: int | None,
    backbone: str,
    model_config: Mapping[str, Any],
    tasks: Sequence[TaskRecord],
    new_files: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str]]],
    version_files: Mapping[str, str],
    trainer_state: TensorFile | Mapping[str, torch.Tensor] | None,
    extra: Mapping[str, Any],
) -> Manifest:
    """Publish version ``(parent or 0) + 1`` into the registry that ``reader`` reads.

    ``lock_timeout_s`` bounds the wait for a concurrent publisher; the other arguments are those of
    ``Registry.publish``.
    """
    if parent is not None and (isinstance(parent, bool) or not isinstance(parent, int) or parent < 1):
        raise ValueError(f"parent must be None (first version) or a version number >= 1, got {parent!r}")
    backend = reader.backend
    version = (parent or 0) + 1
    _check_parent(parent, reader.current_version())  # fail fast, before writing anything; re-checked under lock
    parent_manifest = reader.load_manifest(parent) if parent is not None else None
    config = normalize_config(model_config)
    fingerprint = config_fingerprint(config)
    if parent_manifest is not None:
        _check_lineage(parent_manifest, backbone, fingerprint)
    records = _plan_reuse(parent_manifest, tasks, set(new_files), version_files)
    if trainer_state is not None and not isinstance(trainer_state, tuple):
        trainer_state = TensorFile(trainer_state)

    staged: dict[str, StagedFile] = {}
    try:
        for relpath, content in new_files.items():
            staged[relpath] = backend.stage(relpath, functools.partial(write_tensor_file, content=TensorFile(*content)))
        new_records = {relpath: _record_of(item) for relpath, item in staged.items()}
        records.update(new_records)
        trainer_record = None
        if trainer_state is not None:
            trainer_path = trainer_state_path(version)
            state = TensorFile(*trainer_state)
            staged[trainer_path] = backend.stage(trainer_path, lambda path: write_tensor_file(path, state))
            record = _record_of(staged[trainer_path])
            trainer_record = TrainerStateRecord(path=trainer_path, size=record.size, sha256=record.sha256)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            version=version,
            parent=parent,
            created_at=datetime.now(UTC),
            backbone=backbone,
            model_cfg=config,
            model_cfg_fingerprint=fingerprint,
            tasks=tuple(tasks),
            version_files=dict(version_files),
            files=dict(sorted(records.items())),
            trainer_state=trainer_record,
            extra=dict(extra),
        )
        manifest_bytes = manifest.to_json()
        staged_manifest = backend.stage(manifest.name, lambda path: path.write_bytes(manifest_bytes))
        staged[manifest.name] = staged_manifest

        def prepare() -> list[StagedFile]:
            # Run by the backend where concurrent publishers are not decided yet (under the lock, or before the
            # conditional write that claims the version).
            _check_parent(parent, reader.current_version())
            for relpath, record in new_records.items():
                published = reader.find_record(relpath)
                if published is None:
                    continue
                if published != record:
                    raise ArtifactExists(
                        f"{relpath} is already published with sha256 {published.sha256} ({published.size} bytes) "
                        f"and published files are never rewritten; this publish has {record.sha256} "
                        f"({record.size} bytes): choose a new path (task_file_path / version_file_path) or reuse "
                        "the existing task record"
                    )
                logger.info("%s is already published with identical content; reusing it", relpath)
                backend.discard(staged.pop(relpath))
            return [item for relpath, item in staged.items() if relpath != manifest.name]

        # The files, then the manifest, then CURRENT, last: before it moves no reader can see the new version.
        backend.commit_version(version, prepare=prepare, manifest=staged_manifest, timeout_s=lock_timeout_s)
        staged.clear()
    finally:
        for leftover in staged.values():
            backend.discard(leftover)
    logger.info(
        "published version %d (parent %s, backbone %s): %d tasks, %d new files, %d reused, trainer state: %s",
        version,
        parent,
        backbone,
        len(manifest.tasks),
        len(new_records),
        len(manifest.files) - len(new_records),
        trainer_record is not None,
    )
    return manifest
