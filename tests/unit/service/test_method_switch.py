"""CARE_METHOD: it reaches the model configuration, a registry records it, and a server of another method refuses
the registry (issue 15). tests/integration/test_moram_app.py trains and serves MoRAM through the app."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model.backbone import build_backbone
from model.config import ModelConfig, TrainConfig
from model.head import HeadStatistics
from model.moram import AtomBank, MoramModel, learn_moram_task
from model.synthetic import random_shared, random_task, synthetic_head
from model.trainer import LearnedTask
from registry import IncompatibleArtifact, Registry
from service.inference.backbone import load_backbone
from service.modelstore import NO_ROUTERS, ModelStore, NewTask
from service.settings import Settings

CARE = ModelConfig(backbone="test_vit", image_size=32)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CARE_"):
            monkeypatch.delenv(key)


def test_care_method_flows_from_the_environment_into_the_model_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().model().method == "care"
    monkeypatch.setenv("CARE_METHOD", "moram")
    monkeypatch.setenv("CARE_MORAM_CANDIDATES", "32")
    config = Settings().model()
    assert (config.method, config.moram_candidates) == ("moram", 32)
    assert config.to_dict()["method"] == "moram"
    monkeypatch.setenv("CARE_METHOD", "seta")
    monkeypatch.delenv("CARE_MORAM_CANDIDATES")
    monkeypatch.setenv("CARE_SETA_ANCHOR", "10")
    config = Settings().model()
    assert (config.method, config.seta_anchor) == ("seta", 10.0)
    monkeypatch.setenv("CARE_METHOD", "sota")
    with pytest.raises(ValidationError, match="method"):
        Settings()


def test_a_moram_setting_without_the_moram_method_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARE_MORAM_RANK", "8")
    with pytest.raises(ValueError, match="apply only with method='moram'"):
        Settings().model()


def test_the_service_loads_the_backbone_for_moram_with_the_method_recorded() -> None:
    settings = Settings(backbone="test_vit", backbone_weights="random", image_size=32, method="moram", moram_rank=4)
    config, backbone = load_backbone(settings)
    assert (config.method, config.moram_rank, config.sites) == ("moram", 4, tuple(backbone.site_names))


def test_a_registry_of_another_method_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(CARE, "random")
    store = ModelStore(Registry.from_path(tmp_path / "registry"), CARE, backbone, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    sites = backbone.site_dims
    classifier = torch.randn(2, backbone.feature_dim, generator=generator)
    width = backbone.feature_dim + sum(sites)
    inputs = torch.randn(6, width, generator=generator)
    statistics = HeadStatistics.empty(width).add(inputs, torch.arange(2).repeat(3), 2)
    learned = LearnedTask(
        0,
        random_task(CARE, sites, 0, 2, generator),
        random_shared(CARE, sites, generator),
        classifier,
        None,
        head=synthetic_head(CARE, classifier, sites),
        head_statistics=statistics,
    )
    manifest = store.publish(None, [NewTask(learned, "t-0", ["a", "b"])])
    assert "method" not in manifest.model_cfg  # a CaRE registry records what it recorded before the switch
    store.check(manifest)
    moram = ModelStore(store.registry, dataclasses.replace(CARE, method="moram"), backbone, torch.device("cpu"))
    with pytest.raises(IncompatibleArtifact, match='method: registry has null, this process has "moram"'):
        moram.check(manifest)
    with pytest.raises(IncompatibleArtifact, match="method"):
        moram.load_tasks(manifest)


def test_moram_versions_publish_atoms_and_load_incrementally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = dataclasses.replace(CARE, method="moram", moram_rank=4, moram_top_k=3)
    torch.manual_seed(0)
    backbone = build_backbone(config, "random")
    store = ModelStore(Registry.from_path(tmp_path / "registry"), config, backbone, torch.device("cpu"))
    train = TrainConfig(epochs=1, batch_size=8, min_steps=2)
    generator = torch.Generator().manual_seed(1)
    parent = None
    for index in range(2):
        lineage = store.load_moram_lineage(parent)
        assert lineage.num_tasks == index
        images = torch.randn(8, 3, 32, 32, generator=generator)
        task = learn_moram_task(backbone, config, train, lineage, images, torch.arange(2).repeat(4), 2)
        parent = store.publish(parent, [NewTask(task, f"t-{index}", [f"c{index}-0", f"c{index}-1"])])
    first, second = store.registry.load_manifest(1), parent
    assert second is not None and set(second.version_files) == {"classifier"}
    assert [set(t.files) for t in second.tasks] == [{"atoms"}, {"atoms"}]

    reads: list[str] = []
    real = store.registry.load_tensors
    monkeypatch.setattr(store.registry, "load_tensors", lambda path: reads.append(path) or real(path))
    previous = store.load_tasks(first)
    reads.clear()
    incremental = store.load_tasks(second, (first, previous))
    assert sorted(reads) == sorted([second.version_files["classifier"], second.tasks[1].files["atoms"]])
    full = store.load_tasks(second)
    assert isinstance(incremental.bank, AtomBank) and isinstance(full.bank, AtomBank)
    for got, want in zip(incremental.bank.sites, full.bank.sites, strict=True):
        assert torch.equal(got.atoms.keys, want.atoms.keys) and torch.equal(got.atoms.values, want.atoms.values)
    network = store.network(full)
    assert isinstance(network, MoramModel) and network.num_tasks == 2
    assert store.routers(second, None) is None  # type: ignore[arg-type]  # MoRAM has no routers to cache
    images = torch.randn(3, 3, 32, 32, generator=generator)
    probabilities = network.predict_proba(images, NO_ROUTERS)
    assert probabilities.shape == (3, 4)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))
    # A CaRE lineage cannot be continued from it, and a CaRE store refuses it outright.
    with pytest.raises(ValueError, match="not a CaRE version"):
        store.load_lineage(second, None)  # type: ignore[arg-type]
    care = ModelStore(store.registry, CARE, backbone, torch.device("cpu"))
    with pytest.raises(IncompatibleArtifact, match='method: registry has "moram"'):
        care.load_tasks(second)
