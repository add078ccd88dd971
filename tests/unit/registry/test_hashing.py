"""File hashes, the stat-keyed hash cache, and configuration fingerprints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from registry import HashCache, config_fingerprint, sha256_file


def test_config_fingerprint_is_sha256_of_canonical_json() -> None:
    config = {"b": [1, 2], "a": {"y": 1.5, "x": None}}
    canonical = b'{"a":{"x":null,"y":1.5},"b":[1,2]}'
    assert config_fingerprint(config) == hashlib.sha256(canonical).hexdigest()
    assert config_fingerprint({"a": {"x": None, "y": 1.5}, "b": [1, 2]}) == config_fingerprint(config)
    assert config_fingerprint({**config, "b": [2, 1]}) != config_fingerprint(config)


def test_config_fingerprint_refuses_non_json() -> None:
    with pytest.raises(ValueError, match="JSON"):
        config_fingerprint({"x": object()})


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_cache_hits_for_unchanged_file_and_misses_after_replace(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"one")
    cache = HashCache(racy_window_s=0.0)
    first = cache.sha256(path)
    assert cache.sha256(path) == first == hashlib.sha256(b"one").hexdigest()
    assert (cache.hits, cache.misses) == (1, 1)
    replacement = tmp_path / "new"
    replacement.write_bytes(b"two")  # same size, new inode
    os.replace(replacement, path)
    assert cache.sha256(path) == hashlib.sha256(b"two").hexdigest()
    assert (cache.hits, cache.misses) == (1, 2)


def test_fresh_files_are_not_cached_so_a_quick_in_place_change_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"abcdef")
    cache = HashCache()  # default racy window: the file changed less than 2 s ago
    assert cache.sha256(path) == hashlib.sha256(b"abcdef").hexdigest()
    with open(path, "r+b") as handle:  # flip one byte in place, very likely within the same timestamp tick
        handle.seek(2)
        handle.write(b"X")
    assert cache.sha256(path) == hashlib.sha256(b"abXdef").hexdigest()
    assert cache.hits == 0
    assert len(cache) == 0


def test_negative_racy_window_is_refused() -> None:
    with pytest.raises(ValueError, match="racy_window_s"):
        HashCache(racy_window_s=-1)
