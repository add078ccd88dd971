"""Relative path rules and the canonical path helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry import InvalidPath, Registry, TaskRecord, TensorFile, task_file_path, validate_relpath, version_file_path

from .helpers import BACKBONE, CONFIG, expert_tensors, files_under


def test_canonical_paths() -> None:
    assert task_file_path(7, "t-ab12cd", "experts") == "tasks/0007-t-ab12cd/experts.safetensors"
    assert version_file_path(7, "classifier") == "versions/000007/classifier.safetensors"
    assert validate_relpath(task_file_path(1, "t.1_x", "routers")) == "tasks/0001-t.1_x/routers.safetensors"


@pytest.mark.parametrize(
    "path", ["a.safetensors", "tasks/0001-t/experts.safetensors", "x/y/z-1_2.bin", "versions/000003/shared.st"]
)
def test_valid_paths_are_returned_unchanged(path: str) -> None:
    assert validate_relpath(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "../outside",
        "tasks/../../x",
        "a//b",
        "a/./b",
        "a/",
        "with space",
        "back\\slash",
        "caf\u00e9",
        "tasks/.hidden",
        ".x.tmp",
        "CURRENT",
        "manifests/000001.json",
        "trainer/000001.safetensors",
        ".lock",
    ],
)
def test_invalid_paths_are_refused(path: str) -> None:
    with pytest.raises(InvalidPath) as info:
        validate_relpath(path)
    assert isinstance(info.value, ValueError)
    assert repr(path)[:20] in str(info.value) or path == ""


def test_reserved_names_are_allowed_for_the_registry_itself() -> None:
    assert validate_relpath("manifests/000001.json", allow_reserved=True) == "manifests/000001.json"
    with pytest.raises(InvalidPath):
        validate_relpath("manifests/../x", allow_reserved=True)


@pytest.mark.parametrize(
    ("index", "task_id", "role"), [(-1, "t", "experts"), (1, "a/b", "experts"), (1, "", "experts"), (1, "t", ".x")]
)
def test_helpers_refuse_unusable_parts(index: int, task_id: str, role: str) -> None:
    with pytest.raises(InvalidPath):
        task_file_path(index, task_id, role)


def test_publish_with_bad_path_writes_nothing(reg: Registry, root: Path) -> None:
    bad = "../escape.safetensors"
    task = TaskRecord(task_id="t1", classes=("a",), files={"experts": bad})
    with pytest.raises(InvalidPath, match=r"\.\./escape"):
        reg.publish(
            parent=None,
            backbone=BACKBONE,
            model_config=CONFIG,
            tasks=[task],
            new_files={bad: TensorFile(expert_tensors(0))},
        )
    assert reg.current_version() is None
    assert files_under(root) == []
    assert not (root.parent / "escape.safetensors").exists()
