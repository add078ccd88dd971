"""Manifest content, JSON round trip, schema checks and compatibility checks."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pydantic
import pytest

from registry import (
    SCHEMA_VERSION,
    CorruptArtifact,
    IncompatibleArtifact,
    Registry,
    UnsupportedSchema,
    check_compatible,
    parse_manifest,
)

from .helpers import BACKBONE, CONFIG, publish_task


def test_manifest_records_everything_on_disk(reg: Registry, root: Path) -> None:
    before = datetime.now(UTC)
    v1 = publish_task(reg, None, "t1")
    v2 = publish_task(reg, v1, "t2", seed=1)
    raw = json.loads((root / "manifests" / "000002.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION
    assert (raw["version"], raw["parent"]) == (2, 1)
    assert datetime.fromisoformat(raw["created_at"]).utcoffset() is not None
    assert datetime.fromisoformat(raw["created_at"]) >= before.replace(microsecond=0)
    assert raw["backbone"] == BACKBONE
    assert raw["model_cfg"] == CONFIG
    canonical = json.dumps(CONFIG, sort_keys=True, separators=(",", ":")).encode()
    assert raw["model_cfg_fingerprint"] == hashlib.sha256(canonical).hexdigest()
    assert [t["task_id"] for t in raw["tasks"]] == ["t1", "t2"]
    assert raw["tasks"][1]["classes"] == ["t2-a", "t2-b"]
    assert raw["tasks"][1]["files"] == {
        "experts": "tasks/0002-t2/experts.safetensors",
        "routers": "tasks/0002-t2/routers.safetensors",
    }
    assert raw["version_files"] == {"classifier": "versions/000002/classifier.safetensors"}
    for relpath, record in raw["files"].items():
        data = (root / relpath).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert len(raw["files"]) == 5  # 2 tasks x (experts, routers) + this version's classifier
    assert raw["extra"] == {"accuracy": 0.5 + 2 / 100}
    assert v2.model_cfg == CONFIG


def test_json_round_trip(reg: Registry) -> None:
    manifest = publish_task(reg, None, "t1")
    assert parse_manifest(manifest.to_json(), source="m.json") == manifest
    assert reg.load_manifest(1) == manifest
    assert manifest.created_at.tzinfo == UTC


def test_manifest_is_frozen(reg: Registry) -> None:
    manifest = publish_task(reg, None, "t1")
    with pytest.raises(pydantic.ValidationError):
        manifest.version = 5


def _stored(reg: Registry) -> dict[str, object]:
    manifest = publish_task(reg, None, "t1")
    raw: dict[str, object] = json.loads(manifest.to_json())
    return raw


def test_future_schema_is_refused_with_upgrade_advice(reg: Registry) -> None:
    raw = {**_stored(reg), "schema_version": SCHEMA_VERSION + 1, "new_field": 1}
    with pytest.raises(UnsupportedSchema, match=r"m\.json.*upgrade care-serve"):
        parse_manifest(json.dumps(raw).encode(), source="m.json")


def test_missing_schema_is_refused(reg: Registry) -> None:
    raw = _stored(reg)
    del raw["schema_version"]
    with pytest.raises(UnsupportedSchema, match="schema_version None"):
        parse_manifest(json.dumps(raw).encode(), source="m.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_cfg": {"embed_dim": 9}}, "fingerprint"),
        ({"parent": 3}, "parent"),
        ({"files": {}}, "not listed"),
        ({"trainer_state": {"path": "trainer/000009.safetensors", "size": 1, "sha256": "0" * 64}}, "trainer_state"),
    ],
)
def test_inconsistent_manifest_is_corrupt(reg: Registry, change: dict[str, object], message: str) -> None:
    raw = {**_stored(reg), **change}
    with pytest.raises(CorruptArtifact, match=message) as info:
        parse_manifest(json.dumps(raw).encode(), source="manifests/000001.json")
    assert info.value.relpath == "manifests/000001.json"


def test_truncated_manifest_on_disk_is_reported_with_its_name(reg: Registry, root: Path) -> None:
    publish_task(reg, None, "t1")
    path = root / "manifests" / "000001.json"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CorruptArtifact, match=r"manifests/000001\.json is not valid JSON.*restore it from backup"):
        reg.load_manifest(1)


def test_check_compatible_accepts_same_backbone_and_config(reg: Registry) -> None:
    manifest = publish_task(reg, None, "t1", config={"sites": (0, 1), "embed_dim": 8, "top_k": 2})
    # A tuple was stored as a JSON list; the same configuration written with a list is the same configuration.
    check_compatible(manifest, backbone=BACKBONE, model_config={"top_k": 2, "embed_dim": 8, "sites": [0, 1]})


def test_check_compatible_refuses_other_backbone_and_says_what_to_do(reg: Registry) -> None:
    manifest = publish_task(reg, None, "t1")
    with pytest.raises(IncompatibleArtifact) as info:
        check_compatible(manifest, backbone="vit_base_patch16_224", model_config=CONFIG)
    message = str(info.value)
    assert "version 1" in message and "manifests/000001.json" in message
    assert "'test_vit'" in message and "'vit_base_patch16_224'" in message
    assert "CARE_BACKBONE=test_vit" in message and "CARE_DATA_DIR" in message


def test_check_compatible_refuses_other_config_and_names_the_difference(reg: Registry) -> None:
    manifest = publish_task(reg, None, "t1")
    with pytest.raises(IncompatibleArtifact) as info:
        check_compatible(manifest, backbone=BACKBONE, model_config={**CONFIG, "top_k": 4, "extra_key": True})
    message = str(info.value)
    assert "top_k: registry has 2, this process has 4" in message
    assert "extra_key: registry has null, this process has true" in message
    assert "CARE_DATA_DIR" in message and "version 1" in message
