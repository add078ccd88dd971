"""CARE_METHOD: it reaches the model configuration, a registry records it, and a server of another method refuses
the registry (issue 15). The service trains and serves CaRE only so far, so it refuses to start with another."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model.backbone import build_backbone
from model.config import ModelConfig
from model.head import HeadStatistics
from model.synthetic import random_shared, random_task, synthetic_head
from model.trainer import LearnedTask
from registry import IncompatibleArtifact, Registry
from service.inference.backbone import load_backbone
from service.modelstore import ModelStore, NewTask
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
    with pytest.raises(ValidationError, match="method"):
        Settings()


def test_a_moram_setting_without_the_moram_method_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARE_MORAM_RANK", "8")
    with pytest.raises(ValueError, match="apply only with method='moram'"):
        Settings().model()


def test_the_service_refuses_a_method_it_cannot_serve_yet() -> None:
    settings = Settings(backbone="test_vit", backbone_weights="random", image_size=32, method="moram")
    with pytest.raises(ValueError, match="CARE_METHOD=moram.*does not train or serve it yet"):
        load_backbone(settings)


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
