"""The analytic head: class scores from second-order statistics of the served features, solved in closed form.

Its input z is the pooled feature phi (power-normalised: sign(x) sqrt|x|) concatenated with the pooled input of
every BR-MoE site (the vector the routers read), each block multiplied by a fixed scale so that the blocks weigh
alike. The head is linear discriminant analysis with one shared within-class scatter:

    S = (sum_i z_i z_i^T - sum_c n_c mu_c mu_c^T) / N + lambda I,    W = S^-1 [mu_1 .. mu_C],    b_c = -mu_c^T W_c / 2,

scores s = z W + b, probabilities softmax(s / temperature). G = sum z z^T (D x D), the per-class sums n_c mu_c and
the counts n_c are accumulated task by task, exactly, so the head of the first T tasks is the one a joint fit on
all their features would give: no alignment, no replay, and classes of different tasks are calibrated against
each other (CaRE's cosine head never sees two tasks' classes together). A class of one image is as learnable as
any other, and a task of one class needs no contrast within itself.

Choices, each measured on frozen EfficientNet-Lite0 features at 224 px (docs/benchmarks.md):

* LDA over a ridge regression on random ReLU features (RanPAC's head): 82.9 vs 83.1 on phi alone (Fashion-MNIST,
  10 classes), at a fraction of the state; the site vectors add 2.7 points (85.6), which RanPAC's head on the same
  input did not reach (84.3).
* lambda = ridge_ratio * tr(S) / D, a fixed fraction of the mean eigenvalue. RanPAC picks its ridge per task from
  20 % of the new task's images; with six held-out images that choice collapsed 19 stages of glyphs300 below 5 %.
* The block scales are 1 / rms of each block over the first task's images, fixed for the lineage afterwards.
* Probabilities: softmax(scores / temperature); LDA's scores are its Gaussian model's log-posteriors up to a
  constant, so temperature 1 is the model's own calibration, and the temperature is fitted per version by the
  negative log-likelihood of the newest task's images over every class, from a fixed grid.

State: G (D x D, float64) plus C x D sums; everything but the O(C x D) part is independent of the class count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

# Temperatures tried when calibrating probabilities.
TEMPERATURE_GRID = tuple(0.05 * 1.25**k for k in range(30))  # 0.05 .. ~32
_CHUNK = 4096  # rows per accumulation matmul, bounds the temporaries


def head_inputs(features: Tensor, site_vectors: Sequence[Tensor]) -> Tensor:
    """z (B, D) before scaling: [sign(phi) sqrt|phi|, v_1, ..., v_S] of pooled features and site inputs."""
    root = features.sign() * features.abs().sqrt()
    return torch.cat([root, *site_vectors], dim=1)


def block_scales(inputs: Tensor, block_dims: Sequence[int]) -> Tensor:
    """(D,) scale per input column: 1 / rms of its block over `inputs`, so every block weighs alike."""
    scales = []
    for block in inputs.split(list(block_dims), dim=1):
        rms = float(block.double().square().mean().sqrt())
        scales.append(torch.full((block.shape[1],), 1.0 / rms if rms > 0 else 1.0))
    return torch.cat(scales)


@dataclass(frozen=True)
class HeadStatistics:
    """What the head is solved from: accumulated over every image of every learned class.

    Attributes:
        gram: (D, D) float64, sum of z z^T (z already scaled).
        class_sums: (C, D) float64, per-class sums of z.
        class_counts: (C,) images per class.
    """

    gram: Tensor
    class_sums: Tensor
    class_counts: Tensor

    @classmethod
    def empty(cls, dim: int) -> HeadStatistics:
        return cls(
            torch.zeros(dim, dim, dtype=torch.float64),
            torch.zeros(0, dim, dtype=torch.float64),
            torch.zeros(0, dtype=torch.long),
        )

    @property
    def num_classes(self) -> int:
        return int(self.class_sums.shape[0])

    @property
    def dim(self) -> int:
        return int(self.gram.shape[0])

    def add(self, inputs: Tensor, labels: Tensor, num_new: int) -> HeadStatistics:
        """These statistics plus `num_new` new classes whose images have scaled inputs `inputs`, labels 0..n-1."""
        if inputs.shape[1] != self.dim:
            raise ValueError(f"head inputs of width {inputs.shape[1]}, the head has {self.dim}")
        if len(labels) != len(inputs) or len(labels) == 0 or labels.min() < 0 or labels.max() >= num_new:
            raise ValueError(f"need one label in 0..{num_new - 1} per image, got {len(labels)} for {len(inputs)}")
        gram = self.gram.clone()
        sums = torch.zeros(num_new, self.dim, dtype=torch.float64)
        for rows, cls in zip(inputs.split(_CHUNK), labels.split(_CHUNK), strict=True):
            rows64 = rows.detach().double().cpu()
            gram.addmm_(rows64.T, rows64)
            sums.index_add_(0, cls.cpu(), rows64)
        counts = torch.bincount(labels.cpu(), minlength=num_new)
        if int(counts.min()) == 0:
            raise ValueError("every new class needs at least one image")
        return HeadStatistics(gram, torch.cat([self.class_sums, sums]), torch.cat([self.class_counts, counts]))

    def means(self) -> Tensor:
        """(C, D) float64 class means."""
        return self.class_sums / self.class_counts.double()[:, None]

    def scatter(self, ridge_ratio: float) -> Tensor:
        """The pooled within-class scatter plus its ridge, (D, D) float64."""
        scatter = (self.gram - self.means().T @ self.class_sums) / self.class_counts.sum().double()
        scatter = (scatter + scatter.T) / 2  # exact symmetry against round-off
        ridge = ridge_ratio * float(scatter.diagonal().mean().clamp_min(0)) + 1e-9
        scatter.diagonal().add_(ridge)
        return scatter

    def solve(self, ridge_ratio: float) -> tuple[Tensor, Tensor]:
        """LDA's (D, C) weight and (C,) bias, float64 (see the module docstring)."""
        means = self.means()
        weight = _solve_spd(self.scatter(ridge_ratio), means.T.contiguous())
        bias = -0.5 * (means * weight.T).sum(dim=1)
        return weight, bias

    def leave_one_out_scores(self, ridge_ratio: float, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Scores (N, C) of images that are part of these statistics, each with itself left out of its class mean.

        The scores of a fitted head on its own training images are overconfident; with the image's own class mean
        recomputed without it (mu' = (n mu - z) / (n - 1), W' = S^-1 mu'), they are what an unseen image of that
        class would get (the pooled scatter barely moves). Images of single-image classes have no such score and
        are left out; returns (scores, labels) of the rest, float64.
        """
        z = inputs.double().cpu()
        labels = labels.cpu()
        counts = self.class_counts[labels].double()
        keep = counts > 1
        z, labels, counts = z[keep], labels[keep], counts[keep]
        scatter = self.scatter(ridge_ratio)
        means = self.means()
        weight = _solve_spd(scatter, means.T.contiguous())
        scores = z @ weight - 0.5 * (means * weight.T).sum(dim=1)
        if len(z):
            own_weight = (counts[:, None] * weight.T[labels] - _solve_spd(scatter, z.T.contiguous()).T) / (
                counts[:, None] - 1
            )
            own_mean = (counts[:, None] * means[labels] - z) / (counts[:, None] - 1)
            own = (z * own_weight).sum(dim=1) - 0.5 * (own_mean * own_weight).sum(dim=1)
            scores[torch.arange(len(z)), labels] = own
        return scores, labels

    def to_tensors(self) -> dict[str, Tensor]:
        return {"gram": self.gram, "class_sums": self.class_sums, "class_counts": self.class_counts}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> HeadStatistics:
        missing = {"gram", "class_sums", "class_counts"} - set(tensors)
        if missing:
            raise ValueError(f"head statistics lack {sorted(missing)}; found keys {sorted(tensors)}")
        gram, sums, counts = tensors["gram"].double(), tensors["class_sums"].double(), tensors["class_counts"].long()
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or sums.shape[1:] != gram.shape[:1]:
            raise ValueError(f"head statistics of inconsistent shapes: gram {tuple(gram.shape)}, sums {sums.shape}")
        if counts.shape != sums.shape[:1]:
            raise ValueError(f"head statistics: {counts.shape[0]} counts for {sums.shape[0]} classes")
        return cls(gram, sums, counts)


@dataclass(frozen=True)
class AnalyticHead:
    """The served head of one version.

    Attributes:
        scale: (D,) per-column scale of the head inputs, fixed for the lineage.
        weight: (D, C) float32.
        bias: (C,) float32.
        temperature: Softmax temperature of the scores.
    """

    scale: Tensor
    weight: Tensor
    bias: Tensor
    temperature: float

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def scores(self, inputs: Tensor) -> Tensor:
        """(B, C) LDA scores of unscaled head inputs (B, D) (`head_inputs`)."""
        return torch.addmm(self.bias, inputs * self.scale, self.weight)

    def probabilities(self, inputs: Tensor) -> Tensor:
        return F.softmax(self.scores(inputs) / self.temperature, dim=-1)

    def to(self, device: torch.device | str) -> AnalyticHead:
        return AnalyticHead(self.scale.to(device), self.weight.to(device), self.bias.to(device), self.temperature)

    def to_tensors(self) -> dict[str, Tensor]:
        return {
            "head.scale": self.scale,
            "head.weight": self.weight,
            "head.bias": self.bias,
            "head.temperature": torch.tensor([self.temperature], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], num_classes: int, source: str) -> AnalyticHead:
        try:
            scale, weight, bias = tensors["head.scale"], tensors["head.weight"], tensors["head.bias"]
            temperature = float(tensors["head.temperature"].reshape(-1)[0])
        except KeyError as missing:
            raise ValueError(f"{source}: analytic head lacks {missing}; found {sorted(tensors)}") from None
        if weight.shape != (scale.shape[0], num_classes) or bias.shape != (num_classes,) or not temperature > 0:
            raise ValueError(
                f"{source}: analytic head of shapes scale {tuple(scale.shape)}, weight {tuple(weight.shape)}, "
                f"bias {tuple(bias.shape)} (temperature {temperature}) does not fit {num_classes} classes"
            )
        return cls(scale.float(), weight.float(), bias.float(), temperature)


def _solve_spd(matrix: Tensor, rhs: Tensor) -> Tensor:
    """matrix^-1 rhs for a symmetric positive definite matrix: Cholesky, LU if round-off broke definiteness."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    solved: Tensor = torch.linalg.solve(matrix, rhs)
    return solved


def fit_temperature(scores: Tensor, labels: Tensor) -> float:
    """The grid temperature with the lowest negative log-likelihood of `labels` under softmax(scores / T)."""
    scores, labels = scores.double(), labels.to(scores.device)
    losses = [float(F.cross_entropy(scores / t, labels)) for t in TEMPERATURE_GRID]
    best = min(range(len(losses)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
    return TEMPERATURE_GRID[best]


def solve_head(
    statistics: HeadStatistics,
    scale: Tensor,
    ridge_ratio: float,
    calibration: tuple[Tensor, Tensor],
    previous_temperature: float = 1.0,
) -> AnalyticHead:
    """The head of `statistics`, its temperature fitted on leave-one-out scores of the newest task's images.

    Args:
        statistics: Every class's statistics, the newest task's images included.
        scale: The lineage's input scales.
        ridge_ratio: The ridge as a fraction of the mean eigenvalue of the scatter.
        calibration: (unscaled inputs, global labels) of the newest task's images.
        previous_temperature: Kept when no calibration image belongs to a class of two or more images.
    """
    weight, bias = statistics.solve(ridge_ratio)
    inputs, labels = calibration
    scores, kept = statistics.leave_one_out_scores(ridge_ratio, inputs * scale, labels)
    temperature = fit_temperature(scores, kept) if len(kept) else previous_temperature
    return AnalyticHead(scale, weight.float().to(scale.device), bias.float().to(scale.device), temperature)
