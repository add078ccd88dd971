"""SETA as inferred (model/seta.py): shapes, the fast path against a term-by-term reference, the gate, the anchor,
and learning on real images. tests/unit/service/test_seta_store.py takes versions through the registry."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bench.datasets import digits_split
from model.backbone import SiteBackbone, build_backbone, make_transform
from model.config import ModelConfig, TrainConfig
from model.seta import (
    SetaLineage,
    SetaModel,
    SetaTask,
    advance_seta,
    gate_logits,
    learn_seta_task,
    seta_fast,
    seta_reference,
    top_gates,
)
from model.synthetic import random_seta_bank

SETA = ModelConfig(backbone="test_vit", image_size=32, method="seta")
QUICK = TrainConfig(epochs=2, batch_size=8, min_steps=0)


@pytest.fixture(scope="module")
def backbone() -> SiteBackbone:
    torch.manual_seed(0)
    return build_backbone(SETA, "random")


def quick_task(
    backbone: SiteBackbone, lineage: SetaLineage, classes: int, seed: int, config: ModelConfig = SETA
) -> SetaTask:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4 * classes, 3, 32, 32, generator=generator)
    return learn_seta_task(backbone, config, QUICK, lineage, images, torch.arange(classes).repeat(4), classes)


def test_seta_records_its_fields_and_only_its_own() -> None:
    recorded = SETA.to_dict()
    assert recorded["method"] == "seta" and recorded["seta_anchor"] == SETA.seta_anchor
    assert not any(key.startswith("moram_") for key in recorded)
    assert ModelConfig.from_dict(recorded) == SETA
    assert SETA.fingerprint() != dataclasses.replace(SETA, seta_top_k=3).fingerprint()
    assert "seta_top_k" not in dataclasses.replace(SETA, method="moram").to_dict()


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_the_fast_path_is_the_term_by_term_reference(backbone: SiteBackbone, top_k: int) -> None:
    config = dataclasses.replace(SETA, seta_top_k=top_k)
    bank = random_seta_bank(config, backbone.site_dims, 5, torch.Generator().manual_seed(3))
    site = bank.sites[0]
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randn(3, 7, backbone.site_dims[0], generator=generator)
    routing = torch.randn(3, backbone.site_dims[0], generator=generator)
    fast, reference = seta_fast(tokens, routing, site, config), seta_reference(tokens, routing, site, config)
    assert fast.shape == tokens.shape and fast.abs().max() > 0.1
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    model = SetaModel(config, backbone, bank, torch.randn(4, backbone.feature_dim, generator=generator))
    images = torch.randn(2, 3, 32, 32, generator=generator)
    logits = model.logits(images)
    assert logits.shape == (2, 4)
    torch.testing.assert_close(logits, model.logits(images, path="reference"), rtol=1e-4, atol=1e-4)


def test_the_gate_mixes_only_the_top_k_and_its_weights_sum_to_one() -> None:
    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(6, 8, generator=generator)
    routing = torch.randn(4, 8, generator=generator)
    logits = gate_logits(routing, rows, scale=10.0)
    assert logits.shape == (4, 6) and logits.abs().max() <= 10.0 + 1e-5  # scaled cosines
    index, weights = top_gates(logits, 2)
    assert index.shape == weights.shape == (4, 2)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    assert torch.equal(index, logits.topk(2).indices)
    # A row's length does not change its logits: a new task cannot outbid old ones by growing its row.
    grown = rows.clone()
    grown[5] *= 100
    torch.testing.assert_close(gate_logits(routing, grown, 10.0), logits)


def test_learning_freezes_old_experts_anchors_the_shared_ones_and_is_deterministic(backbone: SiteBackbone) -> None:
    first = quick_task(backbone, SetaLineage.empty(backbone.feature_dim), classes=2, seed=1)
    assert first.index == 0 and len(first.unique) == len(first.gates) == backbone.num_sites
    assert all(g.shape == (1, d) for g, d in zip(first.gates, backbone.site_dims, strict=True))
    assert all(float(torch.linalg.vector_norm(g)) == pytest.approx(1.0, abs=1e-5) for g in first.gates)
    assert all(float(omega.down_weight.sum()) > 0 for omega in first.importance)  # the Fisher was taken
    lineage = advance_seta(SetaLineage.empty(backbone.feature_dim), first, SETA.expert_dim)
    assert lineage.bank is not None
    frozen = [(s.unique.down_weight.clone(), s.gates.clone()) for s in lineage.bank.sites]
    second = quick_task(backbone, lineage, classes=3, seed=2)
    again = quick_task(backbone, lineage, classes=3, seed=2)
    assert all(torch.equal(a.up_weight, b.up_weight) for a, b in zip(second.unique, again.unique, strict=True))
    for (down, gates), site in zip(frozen, lineage.bank.sites, strict=True):
        assert torch.equal(down, site.unique.down_weight) and torch.equal(gates, site.gates)
    assert second.index == 1 and second.classifier.shape == (5, backbone.feature_dim)
    assert second.head is not None and second.head.num_classes == 5
    # The importance accumulates, and the anchor holds the shared experts closer than no anchor does.
    assert all(
        float(b.down_weight.sum()) > float(a.down_weight.sum())
        for a, b in zip(first.importance, second.importance, strict=True)
    )
    loose = quick_task(backbone, lineage, classes=3, seed=2, config=dataclasses.replace(SETA, seta_anchor=0.0))
    assert 0 < second.metrics["shared_drift"] < loose.metrics["shared_drift"], (second.metrics, loose.metrics)
    # The anchor is a proximal step, stable at any stiffness: a huge lambda holds the shared experts closer still
    # (parameters the first task's Fisher found unimportant stay free) and nothing diverges.
    stiff = quick_task(backbone, lineage, classes=3, seed=2, config=dataclasses.replace(SETA, seta_anchor=1e6))
    assert stiff.metrics["shared_drift"] < second.metrics["shared_drift"], stiff.metrics
    assert all(math.isfinite(stiff.metrics[key]) for key in ("first_loss", "final_loss")), stiff.metrics


@pytest.mark.slow
def test_two_tasks_of_digits_are_both_learned_and_routed() -> None:
    """Two tasks of real images (scikit-learn's digits) on the bundled ImageNet CNN: the loss falls in each task,
    the gate sends most test images of each task to its own expert, and, served without a task id, both tasks are
    classified far above chance."""
    pytest.importorskip("sklearn.datasets")
    config = ModelConfig(image_size=64, method="seta")
    backbone = build_backbone(config, "bundled")
    images, targets, train_rows, test_rows = digits_split(make_transform(backbone, 64))
    tasks = [(0, 1), (2, 3)]
    lineage = SetaLineage.empty(backbone.feature_dim)
    train = TrainConfig(epochs=2, batch_size=16, min_steps=0)  # 8 steps a task: this test is about routing
    for classes in tasks:
        rows = torch.cat([train_rows[targets[train_rows] == c][:32] for c in classes])
        labels = torch.tensor([classes.index(int(t)) for t in targets[rows]])
        learned = learn_seta_task(backbone, config, train, lineage, images[rows], labels, len(classes))
        assert learned.metrics["final_loss"] < learned.metrics["first_loss"], learned.metrics
        lineage = advance_seta(lineage, learned, config.expert_dim)
    assert lineage.bank is not None
    model = SetaModel(config, backbone, lineage.bank, lineage.classifier, lineage.head)
    seen = [c for classes in tasks for c in classes]
    last_site = lineage.bank.sites[-1]
    for task, classes in enumerate(tasks):
        rows = torch.cat([test_rows[targets[test_rows] == c] for c in classes])
        truth = torch.tensor([seen.index(int(t)) for t in targets[rows]])
        accuracy = float((model.logits(images[rows]).argmax(1) == truth).float().mean())
        assert accuracy > 0.7, f"task {classes}: accuracy {accuracy:.2f} over {len(seen)} classes (chance 0.25)"
        _, vectors = model.features_and_site_vectors(backbone.embed(images[rows]))
        routed = gate_logits(vectors[-1], last_site.gates, config.seta_gate_scale).argmax(1)
        share = float((routed == task).float().mean())
        assert share > 0.6, f"task {classes}: the gate sends {share:.2f} of its images to its own expert"
