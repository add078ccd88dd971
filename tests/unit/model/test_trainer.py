"""Mechanics of learning one task: determinism, progress, frozen parts, the once-per-image embedding."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model import artifacts
from model.backbone import SiteBackbone
from model.config import ModelConfig, TrainConfig
from model.trainer import LearnedTask, Lineage, TrainProgress, _TaskTrainer, advance, learn_task

FAST = TrainConfig(epochs=2, batch_size=8, align_epochs=1, align_samples_per_class=8, min_steps=0)


def data(count: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    # Class-dependent images so that there is something to learn.
    images = torch.randn(count, 3, 32, 32, generator=generator) * 0.5 + labels[:, None, None, None].float()
    return images, labels


def learn(
    backbone: SiteBackbone, config: ModelConfig, lineage: Lineage, seed: int, train: TrainConfig = FAST
) -> LearnedTask:
    images, labels = data(24, 2, seed)
    return learn_task(backbone, config, train, lineage, images, labels, 2)


def test_learning_is_deterministic(vit_config: ModelConfig, vit_backbone: SiteBackbone) -> None:
    empty = Lineage.empty(vit_backbone.feature_dim)
    first = learn(vit_backbone, vit_config, empty, seed=0)
    second = learn(vit_backbone, vit_config, empty, seed=0)
    for key, value in artifacts.task_expert_tensors(first.task).items():
        assert torch.equal(value, artifacts.task_expert_tensors(second.task)[key]), key
    assert torch.equal(first.classifier, second.classifier)
    other_seed = learn_task(
        vit_backbone, vit_config, TrainConfig(**{**FAST.__dict__, "seed": 7}), empty, *data(24, 2, 0), 2
    )
    assert not torch.equal(first.classifier, other_seed.classifier)


def test_progress_reports_every_step_of_both_stages(vit_config: ModelConfig, vit_backbone: SiteBackbone) -> None:
    # The cosine head (care-reference) aligns after each stage; the analytic head is solved instead.
    vit_config = dataclasses.replace(vit_config, head="cosine")
    lineage = advance(
        Lineage.empty(vit_backbone.feature_dim),
        learn(vit_backbone, vit_config, Lineage.empty(64), 0),
        vit_backbone.site_dims,
        vit_config,
    )
    reports: list[TrainProgress] = []
    train = TrainConfig(epochs=4, batch_size=8, align_epochs=1, align_samples_per_class=8, min_steps=0)
    images, labels = data(20, 2, 1)
    learn_task(vit_backbone, vit_config, train, lineage, images, labels, 2, reports.append)
    adapt = [r for r in reports if r.stage == "adapt"]
    steps_per_epoch = math.ceil(20 / 8)
    # Two stages of 2 epochs each; each stage counts its own steps.
    assert [r.step for r in adapt] == list(range(1, 2 * steps_per_epoch + 1)) * 2
    assert {r.steps for r in adapt} == {2 * steps_per_epoch} and {r.epochs for r in adapt} == {2}
    assert all(math.isfinite(r.loss) for r in adapt)
    assert [r.stage for r in reports].count("align") == 2


def test_backbone_below_the_first_site_runs_once_per_image(
    vit_config: ModelConfig, vit_backbone: SiteBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedded: list[int] = []
    original = type(vit_backbone).embed

    def counting_embed(self: SiteBackbone, images: torch.Tensor) -> torch.Tensor:
        embedded.append(len(images))
        return original(self, images)

    monkeypatch.setattr(type(vit_backbone), "embed", counting_embed)
    before = {k: v.clone() for k, v in vit_backbone.state_dict().items()}
    learn(vit_backbone, vit_config, Lineage.empty(vit_backbone.feature_dim), 0, TrainConfig(epochs=3, batch_size=8))
    assert sum(embedded) == 24
    assert all(p.grad is None for p in vit_backbone.parameters())
    assert all(torch.equal(v, before[k]) for k, v in vit_backbone.state_dict().items())


def test_shared_expert_is_trained_with_the_first_task_then_frozen(
    vit_config: ModelConfig, vit_backbone: SiteBackbone
) -> None:
    dims = vit_backbone.site_dims
    first = learn(vit_backbone, vit_config, Lineage.empty(vit_backbone.feature_dim), 0)
    assert first.shared is not None
    lineage = advance(Lineage.empty(vit_backbone.feature_dim), first, dims, vit_config)
    shared_before = lineage.bank.sites[0].shared.down_weight.clone() if lineage.bank else None
    second = learn(vit_backbone, vit_config, lineage, 1)
    assert second.shared is None
    after = advance(lineage, second, dims, vit_config)
    assert after.bank is not None and shared_before is not None
    assert torch.equal(after.bank.sites[0].shared.down_weight, shared_before)
    assert after.bank.num_tasks == 2 and after.classifier.shape[0] == 4
    # The first task's expert is untouched by the second task's training.
    assert lineage.bank is not None
    assert torch.equal(after.bank.sites[0].experts.down_weight[0], lineage.bank.sites[0].experts.down_weight[0])


def test_new_expert_starts_from_the_mean_of_experts_before_the_previous_one(
    vit_config: ModelConfig, vit_backbone: SiteBackbone
) -> None:
    dims = vit_backbone.site_dims
    lineage = Lineage.empty(vit_backbone.feature_dim)
    for seed in range(3):
        lineage = advance(lineage, learn(vit_backbone, vit_config, lineage, seed), dims, vit_config)
    assert lineage.bank is not None
    trainer = _TaskTrainer(vit_backbone, vit_config, FAST, lineage, 2, None)
    stack = lineage.bank.sites[1].experts
    # Task 3 (0-based) starts from the mean of experts 0 and 1; expert 2, the previous one, is left out.
    torch.testing.assert_close(trainer.task.expert(1).down.weight, stack.down_weight[:2].mean(0))
    torch.testing.assert_close(trainer.task.expert(1).scale, stack.scale[:2].mean(0))


def test_full_covariance_statistics_and_mode_mismatch(vit_config: ModelConfig, vit_backbone: SiteBackbone) -> None:
    vit_config = dataclasses.replace(vit_config, head="cosine")  # class statistics serve the cosine head's alignment
    full = TrainConfig(epochs=1, batch_size=8, covariance="full", align_epochs=1, align_samples_per_class=4)
    learned = learn(vit_backbone, vit_config, Lineage.empty(vit_backbone.feature_dim), 0, full)
    dim = vit_backbone.feature_dim
    assert learned.statistics.spread.shape == (2, dim, dim)
    lineage = advance(Lineage.empty(dim), learned, vit_backbone.site_dims, vit_config)
    with pytest.raises(ValueError, match="keeps full class statistics"):
        learn(vit_backbone, vit_config, lineage, 1)
    second = learn(vit_backbone, vit_config, lineage, 1, full)
    assert second.statistics.spread.shape == (4, dim, dim)


def test_bad_labels_are_refused(vit_config: ModelConfig, vit_backbone: SiteBackbone) -> None:
    images, labels = data(8, 2, 0)
    with pytest.raises(ValueError, match="one label in 0..1 per image"):
        learn_task(vit_backbone, vit_config, FAST, Lineage.empty(64), images, labels + 1, 2)


def test_a_bank_served_first_can_still_be_trained_on(vit_config: ModelConfig, vit_backbone: SiteBackbone) -> None:
    from model.network import CareModel

    lineage = advance(
        Lineage.empty(vit_backbone.feature_dim),
        learn(vit_backbone, vit_config, Lineage.empty(vit_backbone.feature_dim), 0),
        vit_backbone.site_dims,
        vit_config,
    )
    assert lineage.bank is not None
    CareModel(vit_config, vit_backbone, lineage.bank, lineage.classifier).logits(data(4, 2, 3)[0], lineage.routers)
    learn(vit_backbone, vit_config, lineage, 1)  # reuses the folded tensors cached while serving
