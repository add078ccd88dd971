"""The read side on its own: a RegistryReader reads what a Registry published, and cannot publish."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import registry
from registry import CorruptArtifact, HashCache, Registry, RegistryReader

from .helpers import expert_tensors, publish_task


def test_reader_reads_what_a_registry_published(reg: Registry, root: Path) -> None:
    v1 = publish_task(reg, None, "t1")
    v2 = publish_task(reg, v1, "t2", seed=1)
    reader = RegistryReader.from_path(root)
    assert type(reader) is RegistryReader
    assert reader.current_version() == 2
    assert reader.list_versions() == [1, 2]
    assert reader.latest_manifest() == v2
    reader.verify(v2)
    experts = v2.task("t2").files["experts"]
    # A bare path is found through the manifests, newest first, like Registry.open_tensors.
    assert reader.find_record(experts) == v2.files[experts]
    loaded = reader.open_tensors(experts)
    for key, tensor in expert_tensors(1).items():
        assert torch.equal(loaded[key], tensor)
    assert reader.load_tensors(experts).keys() == loaded.keys()
    assert reader.read_metadata(experts) == {"task_id": "t2"}
    state = reader.load_trainer_state(2)
    assert state is not None and state.metadata == {"kind": "stats"}


def test_reader_sees_a_version_published_after_it_was_made(reg: Registry, root: Path) -> None:
    reader = RegistryReader.from_path(root, hash_cache=HashCache())
    assert reader.current_version() is None
    v1 = publish_task(reg, None, "t1")
    assert reader.current_version() == 1
    assert reader.load_manifest(1) == v1


def test_reader_verifies_like_the_registry(reg: Registry, root: Path) -> None:
    v1 = publish_task(reg, None, "t1")
    experts = v1.task("t1").files["experts"]
    path = root / experts
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="sha256"):
        RegistryReader.from_path(root).verify(v1, [experts])


def test_registry_is_a_reader_that_publishes(reg: Registry, root: Path) -> None:
    assert isinstance(reg, RegistryReader)
    assert repr(reg).startswith("Registry(")
    assert not hasattr(RegistryReader, "publish")
    assert not hasattr(RegistryReader.from_path(root), "lock_timeout_s")


def test_package_all_names_what_it_exports() -> None:
    assert "RegistryReader" in registry.__all__
    assert sorted(set(registry.__all__)) == sorted(registry.__all__)
    for name in registry.__all__:
        assert getattr(registry, name) is not None, name
