"""It learns: two tasks of real images (scikit-learn's digits) on the bundled ImageNet backbone."""

from __future__ import annotations

import pytest
import torch

from bench.datasets import digits_split
from model.backbone import build_backbone, make_transform
from model.config import ModelConfig, TrainConfig
from model.network import CareModel
from model.trainer import Lineage, advance, learn_task

TASKS = [(0, 1), (2, 3)]


@pytest.mark.slow
def test_two_tasks_of_digits_are_both_learned() -> None:
    pytest.importorskip("sklearn.datasets")
    config = ModelConfig(image_size=64)
    backbone = build_backbone(config, "bundled")
    transform = make_transform(backbone, 64)
    images, targets, train_rows, test_rows = digits_split(transform)

    lineage = Lineage.empty(backbone.feature_dim)
    train = TrainConfig(epochs=6, batch_size=16)
    for classes in TASKS:
        rows = torch.cat([train_rows[targets[train_rows] == c][:60] for c in classes])
        labels = torch.tensor([classes.index(int(t)) for t in targets[rows]])
        learned = learn_task(backbone, config, train, lineage, images[rows], labels, len(classes))
        lineage = advance(lineage, learned, backbone.site_dims, config)

    model = CareModel(config, backbone, lineage.bank, lineage.classifier, lineage.head)  # type: ignore[arg-type]
    seen = [c for classes in TASKS for c in classes]
    for classes in TASKS:
        rows = torch.cat([test_rows[targets[test_rows] == c] for c in classes])
        predicted = model.logits(images[rows], lineage.routers).argmax(1)
        truth = torch.tensor([seen.index(int(t)) for t in targets[rows]])
        accuracy = float((predicted == truth).float().mean())
        # Chance over the four classes seen is 0.25; both the old and the new task must be far above it.
        assert accuracy > 0.7, f"task {classes}: accuracy {accuracy:.2f} over {len(seen)} classes"
