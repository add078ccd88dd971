"""`verify_registry` and `care-serve registry verify`: a good registry passes; every kind of damage is named."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from registry import LocalDirectoryBackend, Manifest, Registry
from registry.backend import is_temp_name
from registry.verify import verify_registry
from service.cli import main

from .helpers import publish_task


@pytest.fixture
def v2(reg: Registry) -> Manifest:
    return publish_task(reg, publish_task(reg, None, "t1", seed=1), "t2", seed=2)


def _flip_byte(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_good_registry_passes_and_every_file_is_read(root: Path, v2: Manifest) -> None:
    report = verify_registry(LocalDirectoryBackend(root))
    assert report.ok, report.problems
    assert report.current == 2 and report.versions == 2
    # t1's two files, t2's two files, two classifiers, two trainer states
    assert report.files == 8
    assert report.bytes == sum(p.stat().st_size for p in root.rglob("*.safetensors"))


def test_a_flipped_byte_is_named_even_when_its_size_is_right(root: Path, v2: Manifest) -> None:
    experts = v2.task("t1").files["experts"]
    _flip_byte(root / experts)
    report = verify_registry(LocalDirectoryBackend(root))
    assert not report.ok
    assert [p.relpath for p in report.problems] == [experts]
    assert "sha256" in report.problems[0].message and "'experts' file of task 't1'" in report.problems[0].message


def test_every_damaged_file_is_reported_not_only_the_first(root: Path, v2: Manifest) -> None:
    routers = v2.task("t2").files["routers"]
    (root / routers).unlink()
    _flip_byte(root / "trainer/000001.safetensors")
    report = verify_registry(LocalDirectoryBackend(root))
    assert sorted(p.relpath for p in report.problems) == sorted([routers, "trainer/000001.safetensors"])
    assert any("missing" in p.message for p in report.problems)


def test_current_pointing_at_a_missing_manifest_fails(root: Path, v2: Manifest) -> None:
    (root / "CURRENT").write_text("3\n")
    report = verify_registry(LocalDirectoryBackend(root))
    assert [p.relpath for p in report.problems] == ["manifests/000003.json"]
    assert "CURRENT points at version 3" in report.problems[0].message


def test_garbage_in_current_and_a_missing_current_with_manifests_fail(root: Path, v2: Manifest) -> None:
    (root / "CURRENT").write_text("two\n")
    report = verify_registry(LocalDirectoryBackend(root))
    assert [p.relpath for p in report.problems] == ["CURRENT"]
    (root / "CURRENT").unlink()
    report = verify_registry(LocalDirectoryBackend(root))
    assert [p.relpath for p in report.problems] == ["CURRENT"] and "missing" in report.problems[0].message


def test_an_empty_registry_passes(root: Path) -> None:
    root.mkdir()
    report = verify_registry(LocalDirectoryBackend(root))
    assert report.ok and report.current is None and report.files == 0


def test_a_manifest_above_current_is_a_note_not_a_failure(root: Path, v2: Manifest) -> None:
    (root / "CURRENT").write_text("1\n")
    report = verify_registry(LocalDirectoryBackend(root))
    assert report.ok and report.versions == 1
    assert len(report.notes) == 1 and "manifests/000002.json" in report.notes[0]


def test_cli_exits_0_on_a_good_registry_and_1_naming_the_file(
    root: Path, v2: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["registry", "verify", "--registry", str(root)]) == 0
    assert "OK" in capsys.readouterr().out
    classifier = v2.version_files["classifier"]
    _flip_byte(root / classifier)
    assert main(["registry", "verify", "--registry", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {classifier}:" in out and "1 problem(s)" in out


def test_cli_reads_the_registry_under_the_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry.from_path(tmp_path / "data" / "registry")
    publish_task(reg, None, "t1")
    assert main(["registry", "verify", "--data-dir", str(tmp_path / "data")]) == 0
    assert "CURRENT=1" in capsys.readouterr().out
    assert main(["registry", "verify", "--data-dir", str(tmp_path / "nowhere")]) == 2


def test_sweep_removes_only_stale_temp_files(root: Path, v2: Manifest) -> None:
    backend = LocalDirectoryBackend(root)
    old = root / "tasks" / ".experts.safetensors.0123456789abcdef0123456789abcdef.tmp"
    young = root / "versions" / ".classifier.safetensors.fedcba9876543210fedcba9876543210.tmp"
    lookalike = root / "tasks" / "notes.tmp"  # not a staged file: never touched
    for path in (old, young, lookalike):
        path.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    os.utime(lookalike, (hour_ago, hour_ago))
    assert is_temp_name(old.name) and not is_temp_name(lookalike.name)
    assert backend.sweep_temp_files(older_than_s=600) == [old]
    assert not old.exists() and young.exists() and lookalike.exists()
    assert verify_registry(backend).ok
