"""Publishing is atomic: temp files are never visible, the pointer moves last, a crash leaves the old version."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from registry import LocalDirectoryBackend, Registry, StagedFile

from .helpers import publish_task, temp_files_under


class _HookedBackend(LocalDirectoryBackend):
    """A local backend that records commits and can run a hook (or crash) just before one."""

    def __init__(self, root: Path, before_commit: Callable[[str], None] | None = None) -> None:
        super().__init__(root)
        self.commits: list[str] = []
        self._before_commit = before_commit

    def commit(self, staged: StagedFile) -> None:
        if self._before_commit is not None:
            self._before_commit(staged.relpath)
        super().commit(staged)
        self.commits.append(staged.relpath)


def test_crash_while_writing_the_manifest_keeps_the_old_version(root: Path) -> None:
    v1 = publish_task(Registry.from_path(root), None, "t1")

    def crash_on_manifest(relpath: str) -> None:
        if relpath.startswith("manifests/"):
            raise OSError("disk went away")

    crashing = Registry(_HookedBackend(root, crash_on_manifest))
    with pytest.raises(OSError, match="disk went away"):
        publish_task(crashing, v1, "t2", seed=1)

    reader = Registry.from_path(root)
    assert reader.current_version() == 1
    assert reader.list_versions() == [1]
    assert not (root / "manifests" / "000002.json").exists()
    assert temp_files_under(root) == []
    reader.verify(v1)
    # The files committed before the crash are unreferenced; a retry overwrites them and publishes cleanly.
    v2 = publish_task(reader, v1, "t2", seed=2)
    assert reader.current_version() == 2
    reader.verify(v2)


def test_pointer_moves_last_and_readers_never_see_a_partial_version(root: Path) -> None:
    v1 = publish_task(Registry.from_path(root), None, "t1")
    reader = Registry.from_path(root)
    observed: list[tuple[str, int | None, list[int], bool, list[str]]] = []

    def look(relpath: str) -> None:
        final = root / relpath
        staged = [p.name for p in final.parent.iterdir() if p.name.startswith(f".{final.name}.")]
        observed.append((relpath, reader.current_version(), reader.list_versions(), final.exists(), staged))

    backend = _HookedBackend(root, look)
    v2 = publish_task(Registry(backend), v1, "t2", seed=1)

    new_data = sorted(p for p in v2.files if p not in v1.files)
    assert backend.commits[-2:] == ["manifests/000002.json", "CURRENT"]
    assert backend.commits[-3] == "trainer/000002.safetensors"
    assert sorted(backend.commits[:-3]) == new_data
    # Right up to the pointer's rename, every reader still sees exactly version 1.
    assert [(current, versions) for _, current, versions, _, _ in observed] == [(1, [1])] * len(backend.commits)
    # Before its commit a new file exists only as one staged dot file beside its final name.
    for relpath, _, _, exists, staged in observed:
        assert exists == (relpath == "CURRENT")
        assert len(staged) == 1
    assert reader.current_version() == 2 and reader.list_versions() == [1, 2]
    assert temp_files_under(root) == []
