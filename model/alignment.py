"""Classifier alignment by Gaussian replay of per-class feature statistics (CaRE's code, SLCA-style).

After a task's adapters are trained, the features of its classes are summarised by a mean and a covariance
(full, or only its diagonal); the whole cosine classifier is then retrained on samples drawn from every seen
class's Gaussian, so old and new class weights are calibrated against each other without storing any image.

Memory per class: a mean of D floats plus D floats (diagonal) or D*D floats (full covariance; 2.36 MB at D=768,
6.5 MB at D=1280). The diagonal is the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor
from torch.nn import functional as F

from model.classifier import cosine_logits
from model.config import CovarianceMode, TrainConfig

COVARIANCE_RIDGE = 1e-4  # CaRE adds 1e-4 * I to every class covariance


@dataclass(frozen=True)
class ClassStatistics:
    """Per-class feature statistics of every learned class, in class order.

    Attributes:
        mean: (C, D) class means.
        spread: (C, D) variances (diagonal mode) or (C, D, D) covariances (full mode), ridge included.
        count: (C,) number of images each class's statistics came from.
    """

    mean: Tensor
    spread: Tensor
    count: Tensor

    @property
    def mode(self) -> CovarianceMode:
        return "full" if self.spread.dim() == 3 else "diagonal"

    @property
    def num_classes(self) -> int:
        return int(self.mean.shape[0])

    def extend(self, other: ClassStatistics) -> ClassStatistics:
        """Statistics of this and `other`'s classes (other's appended)."""
        if other.mode != self.mode:
            raise ValueError(f"cannot mix {self.mode} and {other.mode} class statistics; keep TrainConfig.covariance")
        return ClassStatistics(
            torch.cat([self.mean, other.mean]),
            torch.cat([self.spread, other.spread]),
            torch.cat([self.count, other.count]),
        )

    def to_tensors(self) -> dict[str, Tensor]:
        key = "cov" if self.mode == "full" else "var"
        return {"mean": self.mean, key: self.spread, "count": self.count}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> ClassStatistics:
        spread = tensors.get("cov", tensors.get("var"))
        if spread is None or "mean" not in tensors or "count" not in tensors:
            raise ValueError(f"trainer state lacks class statistics; found keys {sorted(tensors)}")
        return cls(tensors["mean"], spread, tensors["count"])


def compute_statistics(features: Tensor, labels: Tensor, num_classes: int, mode: CovarianceMode) -> ClassStatistics:
    """Mean and (co)variance of each class's features (labels 0..num_classes-1)."""
    means, spreads, counts = [], [], []
    for label in range(num_classes):
        rows = features[labels == label].double()
        if rows.shape[0] == 0:
            raise ValueError(f"class {label} has no images to compute statistics from")
        mean = rows.mean(dim=0)
        centred = rows - mean
        denominator = max(rows.shape[0] - 1, 1)
        if mode == "full":
            spread = centred.T @ centred / denominator + COVARIANCE_RIDGE * torch.eye(rows.shape[1], dtype=rows.dtype)
        else:
            spread = (centred**2).sum(dim=0) / denominator + COVARIANCE_RIDGE
        means.append(mean.float())
        spreads.append(spread.float())
        counts.append(rows.shape[0])
    return ClassStatistics(torch.stack(means), torch.stack(spreads), torch.tensor(counts, dtype=torch.long))


def _samplers(stats: ClassStatistics) -> Tensor:
    """Per-class factors F with samples = mean + eps @ F.T: Cholesky factors (full) or standard deviations."""
    if stats.mode == "full":
        return cast(Tensor, torch.linalg.cholesky(stats.spread.double()).float())
    return stats.spread.sqrt()


def draw_samples(
    stats: ClassStatistics, factors: Tensor, per_class: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """`per_class` Gaussian samples of every class, shuffled: (C*per_class, D) features and labels."""
    num_classes, dim = stats.mean.shape
    noise = torch.randn(num_classes, per_class, dim, generator=generator)
    if stats.mode == "full":
        samples = stats.mean[:, None, :] + torch.einsum("cpd,ced->cpe", noise, factors)
    else:
        samples = stats.mean[:, None, :] + noise * factors[:, None, :]
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    order = torch.randperm(num_classes * per_class, generator=generator)
    return samples.reshape(-1, dim)[order], labels[order]


def align_classifier(
    weight: Tensor, stats: ClassStatistics, config: TrainConfig, scale: float, generator: torch.Generator
) -> tuple[Tensor, float]:
    """Retrain the whole cosine classifier on Gaussian replay of every seen class.

    Args:
        weight: (C, D) current classifier, rows in the same class order as `stats`.
        stats: Statistics of all C classes.
        config: Epochs, learning rate, samples per class and batch size of the alignment.
        scale: Cosine logit scale tau.
        generator: Random source (samples and their order).

    Returns:
        The aligned (C, D) weight (a new tensor) and the mean loss of the last epoch.
    """
    if stats.num_classes != weight.shape[0]:
        raise ValueError(f"{stats.num_classes} class statistics for a classifier of {weight.shape[0]} classes")
    device = weight.device
    param = torch.nn.Parameter(weight.detach().clone())
    optimizer = torch.optim.SGD([param], lr=config.align_lr, momentum=0.9, weight_decay=5e-4)
    factors = _samplers(stats)
    last_loss = math.nan
    for epoch in range(config.align_epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.align_lr * 0.5 * (1 + math.cos(math.pi * epoch / config.align_epochs))
        features, labels = draw_samples(stats, factors, config.align_samples_per_class, generator)
        features, labels = features.to(device), labels.to(device)
        losses = []
        for start in range(0, features.shape[0], config.align_batch_size):
            batch = slice(start, start + config.align_batch_size)
            loss = F.cross_entropy(scale * cosine_logits(features[batch], param), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        last_loss = sum(losses) / len(losses)
    return param.detach(), last_loss
