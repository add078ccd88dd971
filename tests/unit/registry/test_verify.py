"""Integrity: truncated, altered and missing files are found and named, by verify() and by lazy reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from registry import ArtifactNotFound, CorruptArtifact, HashCache, Manifest, Registry

from .helpers import publish_task


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path, n_bytes: int = 5) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - n_bytes)


@pytest.fixture
def v1(reg: Registry) -> Manifest:
    return publish_task(reg, None, "t1")


def test_truncated_file_is_found_by_verify_and_by_lazy_reads(reg: Registry, root: Path, v1: Manifest) -> None:
    experts = v1.task("t1").files["experts"]
    reg.verify(v1)
    reg.open_tensors(experts)
    _truncate(root / experts)
    with pytest.raises(CorruptArtifact) as info:
        reg.verify(v1)
    message = str(info.value)
    assert experts in message and "'experts' file of task 't1' in version 1" in message
    assert "truncated or corrupted: restore it from backup or republish the task" in message
    assert info.value.relpath == experts
    # A cheap size check refuses the file in lazy reads too, even though it was verified earlier.
    for read in (reg.open_tensors, reg.read_metadata):
        with pytest.raises(
            CorruptArtifact, match=f"{experts}.*bytes but its manifest records {v1.files[experts].size}"
        ):
            read(experts)


def test_flipped_byte_is_found_by_verify(reg: Registry, root: Path, v1: Manifest) -> None:
    routers = v1.task("t1").files["routers"]
    reg.verify(v1)
    _flip_byte(root / routers)
    with pytest.raises(
        CorruptArtifact, match=f"{routers} .* has sha256 [0-9a-f]{{64}} but its manifest records"
    ) as info:
        reg.verify(v1)
    assert info.value.relpath == routers


def test_verify_a_subset(reg: Registry, root: Path, v1: Manifest) -> None:
    experts, routers = v1.task("t1").files["experts"], v1.task("t1").files["routers"]
    _flip_byte(root / routers)
    reg.verify(v1, [experts])
    with pytest.raises(CorruptArtifact, match=routers):
        reg.verify(v1, [experts, routers])
    with pytest.raises(ArtifactNotFound, match="not a file of version 1"):
        reg.verify(v1, ["tasks/0009-x/experts.safetensors"])


def test_missing_file_is_named(reg: Registry, root: Path, v1: Manifest) -> None:
    classifier = v1.version_files["classifier"]
    (root / classifier).unlink()
    with pytest.raises(CorruptArtifact, match=f"{classifier} \\('classifier' file of version 1\\) is missing"):
        reg.verify(v1)
    with pytest.raises(CorruptArtifact, match="is missing"):
        reg.open_tensors(classifier)


def test_garbled_header_of_right_size_is_refused_by_lazy_read(reg: Registry, root: Path, v1: Manifest) -> None:
    experts = v1.task("t1").files["experts"]
    path = root / experts
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00" * 8  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match=f"{experts}.*cannot be read as safetensors"):
        reg.open_tensors(experts)


def test_replaced_file_is_found_even_when_its_hash_was_cached(root: Path) -> None:
    reg = Registry.from_path(root, hash_cache=HashCache(racy_window_s=0.0))
    v1 = publish_task(reg, None, "t1")
    reg.verify(v1)
    experts = root / v1.task("t1").files["experts"]
    altered = experts.with_name("altered")
    altered.write_bytes(experts.read_bytes()[:-1] + b"\x00")
    os.replace(altered, experts)  # same size, new inode and timestamps
    with pytest.raises(CorruptArtifact, match="sha256"):
        reg.verify(v1)


def test_reverifying_reused_files_in_a_later_version_costs_no_hashing(root: Path) -> None:
    cache = HashCache(racy_window_s=0.0)
    reg = Registry.from_path(root, hash_cache=cache)
    v1 = publish_task(reg, None, "t1")
    v2 = publish_task(reg, v1, "t2", seed=1)
    reg.verify(v1)
    assert (cache.hits, cache.misses) == (0, 3)
    reg.verify(v2)
    # t1's two files come from the cache; t2's two files and version 2's classifier are hashed.
    assert (cache.hits, cache.misses) == (2, 6)
    reg.verify(v2)
    assert (cache.hits, cache.misses) == (7, 6)
