"""The task loop MoRAM and SETA share with each other (CaRE's trainer, model/trainer.py, has its own two stages).

`new_class_loss` is the classification objective of a task's new classes; `sgd_epochs` runs the trainer's schedule
over a task's embedded images: SGD with momentum and a per-epoch cosine learning rate, at least `min_steps` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from model.classifier import cosine_logits
from model.config import TrainConfig
from model.trainer import ProgressFn, TrainProgress


def new_class_loss(
    features: Tensor, block: Tensor, old_classifier: Tensor, labels: Tensor, scale: float, train: TrainConfig
) -> Tensor:
    """CE on scaled cosine logits of the new classes (`block`), against the fixed rows of every earlier class too
    with `old_class_negatives` (CaRE's main loss; MoRAM's "-inf on old classes" objective without them)."""
    if train.old_class_negatives and len(old_classifier):
        logits = cosine_logits(features, torch.cat([old_classifier.detach(), block]))
        return F.cross_entropy(scale * logits, labels + len(old_classifier))
    return F.cross_entropy(scale * cosine_logits(features, block), labels)


def sgd_epochs(
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[Tensor], Tensor],
    count: int,
    train: TrainConfig,
    generator: torch.Generator,
    progress: ProgressFn | None = None,
    after_step: Callable[[float], None] | None = None,
) -> list[float]:
    """Train over `count` samples (`loss_of` takes a batch's row indices); returns the mean loss of every epoch.

    Each parameter group's learning rate is its `lr_scale` (1 when absent) times `train.lr`, cosine-annealed per
    epoch to 0; `after_step` receives the first group's learning rate after every optimiser step (SETA's anchor).
    """
    batch = train.batch_size
    steps_per_epoch = math.ceil(count / batch)
    epochs = max(train.epochs, math.ceil(train.min_steps / steps_per_epoch))
    device = optimizer.param_groups[0]["params"][0].device
    epoch_losses: list[float] = []
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = group.get("lr_scale", 1.0) * train.lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        order = torch.randperm(count, generator=generator).to(device)
        total = 0.0
        for step in range(steps_per_epoch):
            loss = loss_of(order[step * batch : (step + 1) * batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(optimizer.param_groups[0]["lr"])
            value = float(loss.detach())
            total += value
            if progress is not None:
                done = epoch * steps_per_epoch + step + 1
                progress(TrainProgress("adapt", epoch + 1, epochs, done, epochs * steps_per_epoch, value))
        epoch_losses.append(total / steps_per_epoch)
    return epoch_losses
