"""Publishing and reading versions: round trip, file reuse, conflicts, trainer state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from registry import (
    ArtifactExists,
    ArtifactNotFound,
    CorruptArtifact,
    IncompatibleArtifact,
    PublishConflict,
    Registry,
    TaskRecord,
    TensorFile,
    TensorNotFound,
    VersionNotFound,
    task_file_path,
)

from .helpers import (
    BACKBONE,
    CONFIG,
    classifier_tensors,
    expert_tensors,
    publish_task,
    router_tensors,
    temp_files_under,
)


def test_empty_registry(reg: Registry) -> None:
    assert reg.current_version() is None
    assert reg.list_versions() == []
    assert reg.latest_manifest() is None
    with pytest.raises(VersionNotFound, match="version 1 is not published"):
        reg.load_manifest(1)


def test_publish_list_load_round_trip(reg: Registry) -> None:
    v1 = publish_task(reg, None, "t1")
    v2 = publish_task(reg, v1, "t2", seed=1)
    assert reg.current_version() == 2
    assert reg.list_versions() == [1, 2]
    assert reg.latest_manifest() == v2
    assert reg.load_manifest(1) == v1
    assert [t.task_id for t in reg.load_manifest(2).tasks] == ["t1", "t2"]
    reg.verify(v1)
    reg.verify(v2)
    experts = v2.task("t2").files["experts"]
    loaded = reg.open_tensors(experts)
    assert loaded.keys() == expert_tensors(1).keys()
    for key, tensor in expert_tensors(1).items():
        assert torch.equal(loaded[key], tensor)
    assert reg.read_metadata(experts) == {"task_id": "t2"}
    assert reg.read_metadata(v2.task("t2").files["routers"]) == {}
    classifier = reg.open_tensors(v2.version_files["classifier"])
    assert torch.equal(classifier["head.weight"], classifier_tensors(2)["head.weight"])
    with pytest.raises(VersionNotFound, match="current version: 2"):
        reg.load_manifest(3)


def test_a_second_instance_sees_published_versions(reg: Registry, root: Path) -> None:
    v1 = publish_task(reg, None, "t1")
    other = Registry.from_path(root)
    assert other.current_version() == 1
    assert other.open_tensors(v1.task("t1").files["routers"]).keys() == router_tensors(0).keys()


def test_task_files_are_reused_not_rewritten(reg: Registry, root: Path) -> None:
    v1 = publish_task(reg, None, "t1")
    t1_paths = sorted(v1.task("t1").files.values())
    stats_before = {p: os.stat(root / p) for p in t1_paths}
    v2 = publish_task(reg, v1, "t2", seed=1)
    v3 = publish_task(reg, v2, "t3", seed=2)
    assert v3.task("t1") == v1.task("t1")
    for path in t1_paths:
        assert v3.files[path] == v2.files[path] == v1.files[path]
        after = os.stat(root / path)
        assert (after.st_ino, after.st_mtime_ns) == (stats_before[path].st_ino, stats_before[path].st_mtime_ns)
    # Each version wrote only its own task's two files and its classifier.
    assert sorted(p for p in v3.files if p not in v2.files) == sorted(
        [*v3.task("t3").files.values(), v3.version_files["classifier"]]
    )
    assert len(list((root / "tasks").iterdir())) == 3


def test_open_tensors_key_selection(reg: Registry) -> None:
    path = publish_task(reg, None, "t1").task("t1").files["experts"]
    assert set(reg.open_tensors(path, "experts.0.")) == {"experts.0.fc1.weight", "experts.0.fc1.bias"}
    assert list(reg.open_tensors(path, ["experts.1.fc1.weight", "experts.0.fc1.bias"])) == [
        "experts.1.fc1.weight",
        "experts.0.fc1.bias",
    ]
    assert reg.open_tensors(path, "nothing.") == {}
    with pytest.raises(TensorNotFound, match=r"experts\.9\.w"):
        reg.open_tensors(path, ["experts.0.fc1.bias", "experts.9.w"])


def test_unknown_paths_are_not_readable(reg: Registry) -> None:
    manifest = publish_task(reg, None, "t1")
    assert manifest.trainer_state is not None
    for path in ["tasks/0001-t1/nothing.safetensors", manifest.trainer_state.path]:
        with pytest.raises(ArtifactNotFound, match="not a file of any published version"):
            reg.open_tensors(path)


def test_noncontiguous_and_view_tensors_are_saved_from_a_private_copy(reg: Registry) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"transposed": base.t(), "view": base[1:3, ::2]}
    path = task_file_path(1, "t1", "experts")
    reg.publish(
        parent=None,
        backbone=BACKBONE,
        model_config=CONFIG,
        tasks=[TaskRecord(task_id="t1", classes=("a",), files={"experts": path})],
        new_files={path: TensorFile(tensors)},
    )
    expected = {key: value.clone() for key, value in tensors.items()}
    base.zero_()  # mutating the caller's tensors after publish must not matter
    loaded = reg.open_tensors(path)
    for key in expected:
        assert torch.equal(loaded[key], expected[key])


def test_stale_parent_is_a_conflict_and_leaves_nothing_behind(reg: Registry, root: Path) -> None:
    v1 = publish_task(reg, None, "t1")
    publish_task(reg, v1, "t2", seed=1)
    files_before = sorted(p for p in root.rglob("*") if p.is_file())
    with pytest.raises(PublishConflict, match="current version is 2") as info:
        publish_task(reg, v1, "t2b", seed=5)
    assert (info.value.expected, info.value.current) == (1, 2)
    with pytest.raises(PublishConflict):
        publish_task(reg, None, "t0")
    assert reg.current_version() == 2
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files_before
    assert temp_files_under(root) == []


def test_published_file_is_never_overwritten_with_other_content(reg: Registry, root: Path) -> None:
    v1 = publish_task(reg, None, "t1")
    experts = v1.task("t1").files["experts"]
    task2 = TaskRecord(task_id="t2", classes=("c",), files={"experts": experts})
    with pytest.raises(ArtifactExists, match=r"tasks/0001-t1/experts\.safetensors is already published"):
        reg.publish(
            parent=1,
            backbone=BACKBONE,
            model_config=CONFIG,
            tasks=[*v1.tasks, task2],
            new_files={experts: TensorFile(expert_tensors(99))},
        )
    assert reg.current_version() == 1
    reg.verify(v1)
    assert temp_files_under(root) == []
    # Identical content under a published path is harmless: it is reused, not rewritten.
    inode = os.stat(root / experts).st_ino
    v2 = reg.publish(
        parent=1,
        backbone=BACKBONE,
        model_config=CONFIG,
        tasks=[*v1.tasks, task2],
        new_files={experts: TensorFile(expert_tensors(0), {"task_id": "t1"})},
    )
    assert v2.files[experts] == v1.files[experts]
    assert os.stat(root / experts).st_ino == inode


def test_inconsistent_file_lists_are_refused(reg: Registry) -> None:
    v1 = publish_task(reg, None, "t1")
    new = task_file_path(2, "t2", "experts")
    task2 = TaskRecord(task_id="t2", classes=("c",), files={"experts": new})
    common: dict[str, Any] = {"parent": 1, "backbone": BACKBONE, "model_config": CONFIG}
    with pytest.raises(ValueError, match="not referenced by any task"):
        reg.publish(**common, tasks=list(v1.tasks), new_files={new: TensorFile(expert_tensors(1))})
    with pytest.raises(ValueError, match="neither in new_files nor a file of parent version 1"):
        reg.publish(**common, tasks=[*v1.tasks, task2], new_files={})
    with pytest.raises(ValueError, match="appears twice"):
        reg.publish(**common, tasks=[*v1.tasks, v1.tasks[0]], new_files={})
    assert reg.current_version() == 1


def test_lineage_keeps_backbone_and_config(reg: Registry) -> None:
    v1 = publish_task(reg, None, "t1")
    with pytest.raises(IncompatibleArtifact, match="a lineage keeps its backbone"):
        publish_task(reg, v1, "t2", backbone="other_backbone")
    with pytest.raises(IncompatibleArtifact, match="a lineage keeps its backbone"):
        publish_task(reg, v1, "t2", config={**CONFIG, "top_k": 3})
    assert reg.current_version() == 1


def test_trainer_state_is_stored_loaded_and_kept_apart_from_server_files(reg: Registry, root: Path) -> None:
    v1 = publish_task(reg, None, "t1")
    v2 = publish_task(reg, v1, "t2", seed=1, trainer_state=False)
    assert v1.trainer_state is not None and v2.trainer_state is None
    assert v1.trainer_state.path == "trainer/000001.safetensors"
    assert v1.trainer_state.path not in v1.files
    state = reg.load_trainer_state(1)
    assert state is not None
    assert torch.equal(state.tensors["class_means"], torch.full((2, 8), 1.0))
    assert state.metadata == {"kind": "stats"}
    assert reg.load_trainer_state(2) is None
    # Servers verify and read only `files`: a missing trainer file does not affect them.
    (root / v1.trainer_state.path).unlink()
    reg.verify(v1)
    with pytest.raises(CorruptArtifact, match=r"trainer/000001\.safetensors \(trainer state of version 1\) is missing"):
        reg.load_trainer_state(1)


def test_altered_trainer_state_is_refused(reg: Registry, root: Path) -> None:
    v1 = publish_task(reg, None, "t1")
    assert v1.trainer_state is not None
    path = root / v1.trainer_state.path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="sha256"):
        reg.load_trainer_state(1)


def test_leftover_manifest_above_current_and_temp_files_are_ignored(reg: Registry, root: Path) -> None:
    publish_task(reg, None, "t1")
    (root / "manifests" / "000002.json").write_text("{ half written")
    (root / "manifests" / ".000003.json.abc.tmp").write_text("{}")
    assert reg.list_versions() == [1]
    with pytest.raises(VersionNotFound):
        reg.load_manifest(2)


def test_garbage_pointer_is_reported(reg: Registry, root: Path) -> None:
    publish_task(reg, None, "t1")
    (root / "CURRENT").write_text("seven\n")
    with pytest.raises(CorruptArtifact, match="pointer file CURRENT holds 'seven'") as info:
        reg.current_version()
    assert info.value.relpath == "CURRENT"


def test_published_files_are_readable_by_other_users(tmp_path: Path) -> None:
    """safetensors creates 0600 files; a server running as another user must still read a published version."""
    import stat

    registry = Registry.from_path(tmp_path / "r")
    manifest = registry.publish(
        parent=None,
        backbone="b",
        model_config={"k": 1},
        tasks=[TaskRecord(task_id="t1", classes=("a",), files={"experts": "tasks/0000-t1/experts.safetensors"})],
        new_files={"tasks/0000-t1/experts.safetensors": ({"x": torch.zeros(2)}, {})},
    )
    for relpath in manifest.files:
        mode = stat.S_IMODE((tmp_path / "r" / relpath).stat().st_mode)
        assert mode & 0o044 == 0o044, oct(mode)


def test_load_tensors_reads_owned_copies_and_refuses_truncated_files(tmp_path: Path) -> None:
    registry = Registry.from_path(tmp_path / "r")
    path = "tasks/0000-t1/experts.safetensors"
    registry.publish(
        parent=None,
        backbone="b",
        model_config={"k": 1},
        tasks=[TaskRecord(task_id="t1", classes=("a",), files={"experts": path})],
        new_files={path: ({"x": torch.arange(6.0)}, {})},
    )
    loaded = registry.load_tensors(path)
    assert torch.equal(loaded["x"], torch.arange(6.0))
    file = tmp_path / "r" / path
    data = file.read_bytes()
    file.write_bytes(data[:-8])
    with pytest.raises(CorruptArtifact, match="experts.safetensors"):
        registry.load_tensors(path)
    assert torch.equal(loaded["x"], torch.arange(6.0))  # what was read stays valid: it is not a view of the file
