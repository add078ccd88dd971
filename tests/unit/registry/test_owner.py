"""Crash leftovers carry their writer's tag, so a restart removes those of dead local processes at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from registry.backend import LocalDirectoryBackend, temp_owner
from registry.owner import owner_tag, written_by_dead_local_process
from service.jobs.uploads import STAGING_PREFIX, staging_owner, stale_staging_dirs

HOUR = 3600.0


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def tag_of(pid: int) -> str:
    return owner_tag().rpartition("p")[0] + f"p{pid}"


def test_tags_tell_dead_local_writers_from_live_and_foreign_ones() -> None:
    assert not written_by_dead_local_process(owner_tag())  # this process
    assert written_by_dead_local_process(tag_of(dead_pid()))
    assert not written_by_dead_local_process("0123abcd" + "1f" + f"p{dead_pid()}")  # another host or container
    assert not written_by_dead_local_process(None) and not written_by_dead_local_process("junk")


def test_a_restart_removes_a_dead_publishers_temp_files_at_once_and_keeps_the_rest(tmp_path: Path) -> None:
    backend = LocalDirectoryBackend(tmp_path)
    staged = backend.stage("versions/000001/classifier.safetensors", lambda p: p.write_bytes(b"x"))
    assert temp_owner(staged.temp_path.name) == owner_tag()
    dead = staged.temp_path.with_name(f".classifier.safetensors.{tag_of(dead_pid())}.{'a' * 32}.tmp")
    foreign = staged.temp_path.with_name(f".classifier.safetensors.0123abcd1fp12.{'b' * 32}.tmp")
    untagged = staged.temp_path.with_name(f".classifier.safetensors.{'c' * 32}.tmp")  # an older release's name
    for path in (dead, foreign, untagged):
        path.write_bytes(b"x")
    assert backend.sweep_temp_files(older_than_s=HOUR) == [dead]
    assert staged.temp_path.exists() and foreign.exists() and untagged.exists()
    backend.commit(staged)  # our own publish is untouched and still commits


def test_staging_directories_of_dead_local_submits_go_at_once(tmp_path: Path) -> None:
    dead = tmp_path / f"{STAGING_PREFIX}{tag_of(dead_pid())}-{'0' * 16}"
    live = tmp_path / f"{STAGING_PREFIX}{owner_tag()}-{'1' * 16}"
    legacy = tmp_path / f"{STAGING_PREFIX}{'2' * 16}"
    for path in (dead, live, legacy):
        path.mkdir()
    assert staging_owner(live.name) == owner_tag() and staging_owner(legacy.name) is None
    assert list(stale_staging_dirs(tmp_path, HOUR)) == [dead]
    time.sleep(0.01)
    assert sorted(stale_staging_dirs(tmp_path, 0.0)) == sorted([dead, live, legacy])  # by age, as before
