"""The analytic head through the registry: versioned with its task, exact round trip, rollback, refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.backbone import SiteBackbone, build_backbone
from model.config import ModelConfig, TrainConfig
from model.trainer import LearnedTask, Lineage, learn_task
from registry import Registry
from service.inference.snapshot import SnapshotLoader
from service.modelstore import ModelStore, NewTask
from service.routers.source import new_router_cache

CPU = torch.device("cpu")
CONFIG = ModelConfig(backbone="test_vit", image_size=32)
TRAIN = TrainConfig(epochs=1, batch_size=8, min_steps=2, old_class_negatives=True)


@pytest.fixture(scope="module")
def backbone() -> SiteBackbone:
    torch.manual_seed(0)
    return build_backbone(CONFIG, "random")


def task_data(classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(5)
    images = torch.randn(len(labels), 3, 32, 32, generator=generator) * 0.3 + labels[:, None, None, None] - seed
    return images, labels


def learn_and_publish(store: ModelStore, classes: int, seed: int) -> tuple[LearnedTask, int]:
    manifest = store.registry.latest_manifest()
    cache = new_router_cache(CPU, None)
    lineage = store.load_lineage(manifest, cache) if manifest is not None else Lineage.empty(64)
    learned = learn_task(store.backbone, CONFIG, TRAIN, lineage, *task_data(classes, seed), classes)
    labels = [f"s{seed}-{k}" for k in range(classes)]
    published = store.publish(manifest, [NewTask(learned, f"t-{seed}", labels)])
    return learned, published.version


def test_each_version_keeps_its_own_head_and_statistics_and_rollback_serves_it(
    tmp_path: Path, backbone: SiteBackbone
) -> None:
    store = ModelStore(Registry.from_path(tmp_path / "registry"), CONFIG, backbone, CPU)
    first, v1 = learn_and_publish(store, classes=2, seed=0)
    second, v2 = learn_and_publish(store, classes=1, seed=1)  # a one-class task
    assert first.head is not None and second.head is not None and second.head_statistics is not None
    assert (first.head.num_classes, second.head.num_classes) == (2, 3)

    for learned, version in ((first, v1), (second, v2)):
        loaded = store.load_tasks(store.registry.load_manifest(version))
        assert loaded.head is not None and learned.head is not None
        assert torch.equal(loaded.head.weight, learned.head.weight)
        assert torch.equal(loaded.head.scale, learned.head.scale)
        assert loaded.head.temperature == learned.head.temperature
    lineage = store.load_lineage(store.registry.load_manifest(v2), new_router_cache(CPU, None))
    assert lineage.head_statistics is not None
    assert torch.equal(lineage.head_statistics.gram, second.head_statistics.gram)
    assert lineage.head_statistics.class_counts.tolist() == [5, 5, 5]

    # Rolling back is serving an older version: it answers with that version's head over that version's classes.
    loader = SnapshotLoader(store, new_router_cache(CPU, None))
    images = task_data(2, 0)[0]
    served_v1 = loader.load(store.registry.load_manifest(v1), None)
    served_v2 = loader.load(store.registry.load_manifest(v2), None)
    p1, p2 = served_v1.probabilities(images), served_v2.probabilities(images)
    assert p1.shape == (10, 2) and p2.shape == (10, 3)
    torch.testing.assert_close(p1.sum(1), torch.ones(10))
    assert served_v1.labels == ("s0-0", "s0-1") and served_v2.labels == ("s0-0", "s0-1", "s1-0")
    assert served_v1.network is not None and served_v2.network is not None
    scores_v1 = served_v1.network.logits(images, served_v1.routers)  # type: ignore[arg-type]
    scores_v2 = served_v2.network.logits(images, served_v2.routers)  # type: ignore[arg-type]
    assert not torch.allclose(scores_v1, scores_v2[:, :2])  # the second task re-solved the first task's classes


def test_a_registry_of_the_other_head_is_refused(tmp_path: Path, backbone: SiteBackbone) -> None:
    store = ModelStore(Registry.from_path(tmp_path / "registry"), CONFIG, backbone, CPU)
    learn_and_publish(store, classes=2, seed=0)
    cosine = ModelStore(store.registry, dataclasses.replace(CONFIG, head="cosine"), backbone, CPU)
    manifest = store.registry.latest_manifest()
    assert manifest is not None
    with pytest.raises(Exception, match="head"):
        cosine.load_tasks(manifest)
