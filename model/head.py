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
* lambda = ratio * tr(S) / D, a fraction of the mean eigenvalue, and the softmax temperature are chosen together
  from fixed grids by the exact leave-one-out negative log-likelihood, accumulated over every image of every task
  so far (each task adds its images' evidence when it is learned; `selection` keeps the sums). RanPAC picks its
  ridge per task from 20 % of the new task's images; with six held-out images that choice collapsed 19 stages of
  glyphs300 below 5 %. Measured on frozen features, the best ratio is 1-3 on Fashion-MNIST and 0.01 on glyphs
  (100 vs 20 images a class), and the leave-one-out likelihood finds it on both.
* The block scales are 1 / rms of each block over the first task's images, fixed for the lineage afterwards.
* Probabilities: softmax(scores / temperature), the temperature of the same leave-one-out choice, so that the
  probabilities are calibrated on images the head was not fitted on.

State: G (D x D, float64) plus C x D sums; everything but the O(C x D) part is independent of the class count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

# Temperatures and ridge ratios tried, jointly, by the leave-one-out likelihood.
TEMPERATURE_GRID = tuple(0.05 * 1.25**k for k in range(30))  # 0.05 .. ~32
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
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
        selection: (len(RIDGE_GRID), len(TEMPERATURE_GRID)) float64, summed leave-one-out negative log-likelihood of
            every image scored so far, for each (ridge ratio, temperature) pair.
    """

    gram: Tensor
    class_sums: Tensor
    class_counts: Tensor
    selection: Tensor

    @classmethod
    def empty(cls, dim: int) -> HeadStatistics:
        return cls(
            torch.zeros(dim, dim, dtype=torch.float64),
            torch.zeros(0, dim, dtype=torch.float64),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(len(RIDGE_GRID), len(TEMPERATURE_GRID), dtype=torch.float64),
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
        return HeadStatistics(
            gram, torch.cat([self.class_sums, sums]), torch.cat([self.class_counts, counts]), self.selection
        )

    def with_evidence(self, inputs: Tensor, labels: Tensor) -> HeadStatistics:
        """These statistics with the leave-one-out likelihood of `inputs` (scaled, already added; global labels)
        under every (ridge ratio, temperature) pair added to `selection`."""
        evidence = torch.zeros_like(self.selection)
        for row, ratio in enumerate(RIDGE_GRID):
            scores, kept = self.leave_one_out_scores(ratio, inputs, labels)
            if len(kept) == 0:
                return self  # no class of two images: nothing to learn about the ridge
            for column, temperature in enumerate(TEMPERATURE_GRID):
                evidence[row, column] = F.cross_entropy(scores / temperature, kept, reduction="sum")
        evidence = evidence.nan_to_num(nan=torch.inf, posinf=torch.inf)
        return dataclasses.replace(self, selection=self.selection + evidence)

    def choice(self) -> tuple[float, float] | None:
        """(ridge ratio, temperature) with the lowest accumulated leave-one-out loss; None without evidence."""
        if not bool((self.selection != 0).any()):
            return None
        best = int(torch.argmin(self.selection))
        return RIDGE_GRID[best // len(TEMPERATURE_GRID)], TEMPERATURE_GRID[best % len(TEMPERATURE_GRID)]

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
        """Scores (N, C) of images that are part of these statistics, each scored by the head refitted without it.

        A fitted head scores its own training images far too well: with more input dimensions than images, an image
        is separable from the others through the direction it adds to the scatter. Leaving it out exactly means
        removing it from its class mean (mu' = (n mu - z) / (n - 1)) and from the within-class scatter
        (W' = W - n / (n - 1) u u^T with u = z - mu, N' = N - 1), which Sherman-Morrison turns into a rank-one
        correction of one shared solve; the ridge keeps the value of the full fit. Images of single-image classes
        have no such score and are left out. Returns (scores, labels) of the rest, float64.
        """
        z = inputs.double().cpu()
        labels = labels.cpu()
        counts = self.class_counts[labels].double()
        keep = counts > 1
        z, labels, n = z[keep], labels[keep], counts[keep][:, None]
        total = float(self.class_counts.sum())
        means = self.means()
        if len(z) == 0:
            return torch.zeros(0, self.num_classes, dtype=torch.float64), labels
        # B = W / (N - 1) + lambda I, the scatter of N - 1 images before the rank-one downdate.
        ridged = self.scatter(ridge_ratio)
        ridge = ridged.diagonal() - ((self.gram - means.T @ self.class_sums) / total).diagonal()
        system = (ridged - torch.diag(ridge)) * (total / (total - 1)) + torch.diag(ridge)
        u = z - means[labels]
        # One factorisation for every right-hand side: B^-1 mu_k, B^-1 u, B^-1 z.
        solved = _solve_spd(system, torch.cat([means, u, z]).T.contiguous()).T
        classes = len(means)
        weight = solved[:classes].T  # (D, C)
        a, pz = solved[classes : classes + len(z)], solved[classes + len(z) :]
        beta = n / ((n - 1) * (total - 1))
        gamma = beta / (1 - beta * (u * a).sum(dim=1, keepdim=True))  # Sherman-Morrison factor
        # Other classes: s_k = z^T A' mu_k - mu_k^T A' mu_k / 2 with A' = B^-1 + gamma a a^T.
        u_w, z_w = u @ weight, z @ weight  # (N, C): u^T B^-1 mu_k, z^T B^-1 mu_k
        mu_w = (means * weight.T).sum(dim=1)  # (C,)
        za, mua = (z * a).sum(dim=1, keepdim=True), a @ means.T  # z^T a, mu_k^T a
        scores = z_w - 0.5 * mu_w + gamma * u_w * (za - 0.5 * mua)
        # Own class, with its mean left without the image: B^-1 mu' = (n B^-1 mu - B^-1 z) / (n - 1).
        rows = torch.arange(len(z))
        own_mean = (n * means[labels] - z) / (n - 1)
        own_weight = (n * weight.T[labels] - pz) / (n - 1)
        u_own = (u * own_weight).sum(dim=1, keepdim=True)
        own = (z * own_weight).sum(dim=1, keepdim=True) + gamma * u_own * za
        own -= 0.5 * ((own_mean * own_weight).sum(dim=1, keepdim=True) + gamma * u_own * (own_mean * a).sum(1, True))
        scores[rows, labels] = own[:, 0]
        return scores, labels

    def to_tensors(self) -> dict[str, Tensor]:
        return {
            "gram": self.gram,
            "class_sums": self.class_sums,
            "class_counts": self.class_counts,
            "selection": self.selection,
        }

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
        selection = tensors.get("selection")
        grid = (len(RIDGE_GRID), len(TEMPERATURE_GRID))
        if selection is None or tuple(selection.shape) != grid:  # another grid: start collecting evidence again
            selection = torch.zeros(grid, dtype=torch.float64)
        return cls(gram, sums, counts, selection.double())


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
    ridge_ratio: float = math.nan  # the ridge it was solved with (a fraction of the scatter's mean eigenvalue)

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
        return AnalyticHead(
            self.scale.to(device), self.weight.to(device), self.bias.to(device), self.temperature, self.ridge_ratio
        )

    def to_tensors(self) -> dict[str, Tensor]:
        return {
            "head.scale": self.scale,
            "head.weight": self.weight,
            "head.bias": self.bias,
            "head.temperature": torch.tensor([self.temperature], dtype=torch.float64),
            "head.ridge_ratio": torch.tensor([self.ridge_ratio], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], num_classes: int, source: str) -> AnalyticHead:
        try:
            scale, weight, bias = tensors["head.scale"], tensors["head.weight"], tensors["head.bias"]
            temperature = float(tensors["head.temperature"].reshape(-1)[0])
            ridge_ratio = float(tensors.get("head.ridge_ratio", torch.tensor([math.nan])).reshape(-1)[0])
        except KeyError as missing:
            raise ValueError(f"{source}: analytic head lacks {missing}; found {sorted(tensors)}") from None
        if weight.shape != (scale.shape[0], num_classes) or bias.shape != (num_classes,) or not temperature > 0:
            raise ValueError(
                f"{source}: analytic head of shapes scale {tuple(scale.shape)}, weight {tuple(weight.shape)}, "
                f"bias {tuple(bias.shape)} (temperature {temperature}) does not fit {num_classes} classes"
            )
        return cls(scale.float(), weight.float(), bias.float(), temperature, ridge_ratio)


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
    calibration: tuple[Tensor, Tensor],
    ridge_ratio: float | None = None,
    previous_temperature: float = 1.0,
) -> tuple[AnalyticHead, HeadStatistics]:
    """The head of `statistics` after the newest task, and the statistics with that task's evidence added.

    Args:
        statistics: Every class's statistics, the newest task's images included.
        scale: The lineage's input scales.
        calibration: (unscaled inputs, global labels) of the newest task's images.
        ridge_ratio: A fixed ridge ratio; None chooses it (and the temperature) by the accumulated leave-one-out
            likelihood.
        previous_temperature: Used while no task has had a class of two or more images.
    """
    inputs, labels = calibration
    statistics = statistics.with_evidence(inputs * scale, labels)
    chosen = statistics.choice()
    ratio, temperature = chosen if chosen is not None else (RIDGE_GRID[2], previous_temperature)
    if ridge_ratio is not None and ridge_ratio != ratio:
        ratio = ridge_ratio
        scores, kept = statistics.leave_one_out_scores(ratio, inputs * scale, labels)
        temperature = fit_temperature(scores, kept) if len(kept) else previous_temperature
    weight, bias = statistics.solve(ratio)
    head = AnalyticHead(scale, weight.float().to(scale.device), bias.float().to(scale.device), temperature, ratio)
    return head, statistics
