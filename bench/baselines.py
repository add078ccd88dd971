"""Class-incremental baselines on frozen-backbone features: SimpleCIL and training-free RanPAC.

Both classifiers see only feature tensors: the benchmark embeds images with the frozen backbone and calls
:meth:`IncrementalClassifier.learn` once per task with that task's features and **global** labels. Classes arrive
in order, so task ``k`` must bring exactly the classes ``num_classes .. num_classes + n - 1``. Prediction is
class-incremental: argmax over every class seen so far, no task id.

* :class:`SimpleCIL` (Zhou et al., arXiv 2303.07338): prototype = mean raw feature of each class, prediction =
  argmax cosine(feature, prototype). Old prototypes never change, so the final model does not depend on how the
  classes were split into tasks.
* :class:`RanPAC` (McDonnell et al., arXiv 2307.02251), "no Phase 1" variant (no first-task PETL adapter): fixed
  random projection ``W`` (D x M, N(0, 1)), ``h = ReLU(f @ W)`` on raw (uncentred, unnormalised) features as in
  the original code, exact accumulation of ``G = sum h^T h`` and ``Q = sum h^T y`` (one-hot 0/1 targets), and a
  plain linear head ``W_o = (G + lambda I)^-1 Q`` (the original's head; PILOT's port L2-normalises ``h`` and the
  rows of ``W_o`` in a cosine head instead, which is not what is implemented here).

RanPAC lambda selection, per task, as in the original ``optimise_ridge_parameter``: candidates
``10^-8 .. 10^8`` (17 values); the **current task's** ``h`` and targets alone are split 80/20 (after a seeded
random permutation: the original takes the first 80% of a shuffled loader); for each candidate a ridge regression
is fitted on the 80% part's own Gram matrix and targets (``G``/``Q`` of earlier tasks are *not* used) and scored
by mean squared error against the one-hot targets of the 20% part; the smallest loss wins (ties: smallest lambda).
The selected lambda is then used with the accumulated ``G``/``Q`` of all tasks. Only the current task's target
columns are scored: the original also scores the other classes' columns, but there both target and prediction
are exactly zero, so the argmin is the same. Instead of 17 M x M solves, the candidates are scored through one
SVD (or eigendecomposition) of the 80% part, which gives the same ridge solutions in closed form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_RIDGES", "IncrementalClassifier", "RanPAC", "SimpleCIL", "ridge_validation_losses"]

# The original RanPAC grid: 10.0 ** np.arange(-8, 9).
DEFAULT_RIDGES: tuple[float, ...] = tuple(10.0**k for k in range(-8, 9))
# Rows per matmul block when projecting or predicting: bounds the N x M activations held at once.
_CHUNK_ROWS = 2048


@runtime_checkable
class IncrementalClassifier(Protocol):
    """A class-incremental classifier over frozen-backbone features (no task id at test time)."""

    name: str

    def learn(self, features: Tensor, labels: Tensor) -> None:
        """Add one task: ``features`` (N, D) float, ``labels`` (N,) global indices of the task's new classes."""
        ...

    def predict(self, features: Tensor) -> Tensor:
        """Return (N,) int64 predicted global class indices over all classes seen so far."""
        ...

    @property
    def num_classes(self) -> int:
        """Number of classes learned so far."""
        ...


def _check_features(features: Tensor, dim: int | None) -> Tensor:
    """Validate an (N, D) floating feature tensor (D must match ``dim`` when given); return it as float32."""
    if features.ndim != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a 2-D floating tensor, got shape {tuple(features.shape)} {features.dtype}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"features have dimension {features.shape[1]}, expected {dim}")
    return features.float()


def _check_task(features: Tensor, labels: Tensor, num_seen: int, dim: int | None) -> tuple[Tensor, Tensor, int]:
    """Validate one task; return (float32 features, labels local to the task, number of new classes)."""
    feats = _check_features(features, dim)
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0] or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be a 1-D integer tensor of length {feats.shape[0]}, got {tuple(labels.shape)}")
    if feats.shape[0] == 0:
        raise ValueError("a task needs at least one training sample")
    if not bool(torch.isfinite(feats).all()):
        raise ValueError("features contain NaN or infinity")
    local = labels.long() - num_seen
    present = torch.unique(local)
    n_new = present.numel()
    # Classes must arrive in order and completely: every new class has samples and no old class reappears.
    if not torch.equal(present, torch.arange(n_new)):
        raise ValueError(f"task labels must be exactly the new classes {num_seen}..{num_seen + n_new - 1}")
    return feats, local, n_new


class SimpleCIL:
    """Nearest class-mean classifier with cosine similarity on frozen features (nothing trained)."""

    name = "simplecil"

    def __init__(self) -> None:
        self._prototypes = torch.zeros(0, 0)  # (C, D) raw class means, float32
        self._unit = torch.zeros(0, 0)  # the same rows L2-normalised, cached for predict

    @property
    def num_classes(self) -> int:
        """Number of classes learned so far."""
        return int(self._prototypes.shape[0])

    @property
    def prototypes(self) -> Tensor:
        """A copy of the (C, D) class-mean prototypes."""
        return self._prototypes.clone()

    def learn(self, features: Tensor, labels: Tensor) -> None:
        """Append the mean feature of each new class as its prototype (see :class:`IncrementalClassifier`)."""
        dim = int(self._prototypes.shape[1]) if self.num_classes else None
        feats, local, n_new = _check_task(features, labels, self.num_classes, dim)
        # Sum in float64 so that a class mean does not depend on how many samples share its task.
        sums = torch.zeros(n_new, feats.shape[1], dtype=torch.float64).index_add_(0, local, feats.double())
        counts = torch.bincount(local, minlength=n_new).to(torch.float64)
        means = (sums / counts[:, None]).float()
        self._prototypes = torch.cat([self._prototypes, means]) if self.num_classes else means
        self._unit = F.normalize(self._prototypes, dim=1)

    def predict(self, features: Tensor) -> Tensor:
        """Argmax cosine similarity to the prototypes (see :class:`IncrementalClassifier`)."""
        if not self.num_classes:
            raise RuntimeError("SimpleCIL has not learned any class yet")
        feats = _check_features(features, int(self._prototypes.shape[1]))
        return (F.normalize(feats, dim=1) @ self._unit.T).argmax(dim=1)


def ridge_validation_losses(
    h_fit: Tensor, y_fit: Tensor, h_val: Tensor, y_val: Tensor, ridges: Sequence[float] = DEFAULT_RIDGES
) -> Tensor:
    """Validation MSE of ridge regressions fitted on one part of the data, for each candidate lambda.

    For each ``lam`` this equals fitting ``W = (h_fit^T h_fit + lam I)^-1 h_fit^T y_fit`` and returning
    ``mean((h_val @ W - y_val)^2)``, but it uses one decomposition for all candidates: a thin SVD of ``h_fit``
    when it has no more rows than columns (``W = V diag(s / (s^2 + lam)) U^T y_fit``), otherwise an
    eigendecomposition of the M x M Gram matrix (``W = V diag(1 / (e + lam)) V^T h_fit^T y_fit``).

    Args:
        h_fit: (n_fit, M) regressors of the fitting part.
        y_fit: (n_fit, C) targets of the fitting part.
        h_val: (n_val, M) regressors of the validation part.
        y_val: (n_val, C) targets of the validation part.
        ridges: Candidate regularisation strengths, all > 0.

    Returns:
        (len(ridges),) float64 losses, in the order of ``ridges``.
    """
    h_fit, y_fit, h_val, y_val = (t.double() for t in (h_fit, y_fit, h_val, y_val))
    if h_fit.shape[0] <= h_fit.shape[1]:
        u, s, vh = torch.linalg.svd(h_fit, full_matrices=False)
        left, right, scale, power = h_val @ vh.T, u.T @ y_fit, s * s, s
    else:
        evals, evecs = torch.linalg.eigh(h_fit.T @ h_fit)
        # The Gram matrix is PSD; clamp the round-off negatives so that 1 / (e + lam) keeps its sign.
        scale = evals.clamp_min(0.0)
        left, right, power = h_val @ evecs, evecs.T @ (h_fit.T @ y_fit), torch.ones_like(scale)
    losses = [((left * (power / (scale + lam))) @ right - y_val).square().mean() for lam in ridges]
    return torch.stack(losses)


class RanPAC:
    """Training-free RanPAC: random ReLU projection + exactly accumulated ridge-regression head.

    Args:
        num_projections: M, the random projection width (the paper uses 10000; 2-4k keeps the O(M^3) solve
            cheap on CPU). ``G`` takes ``8 * M^2`` bytes (128 MiB at M=4096).
        seed: Seeds the projection matrix and the 80/20 splits used for lambda selection.
        ridge: A fixed lambda for every task, bypassing selection (tests, ablations).
        ridges: Candidate lambdas for per-task selection (default ``10^-8 .. 10^8``).
        val_fraction: Fraction of the current task's samples held out to score candidates (original: 0.2).

    The projection ``W`` is drawn at the first :meth:`learn`, once the feature dimension is known. If a task is
    too small to have both a fitting and a held-out sample, selection is skipped and the previous task's lambda
    (1.0 for the first task) is reused.
    """

    name = "ranpac"

    def __init__(
        self,
        num_projections: int = 2048,
        *,
        seed: int = 0,
        ridge: float | None = None,
        ridges: Sequence[float] = DEFAULT_RIDGES,
        val_fraction: float = 0.2,
    ) -> None:
        if num_projections < 1:
            raise ValueError(f"num_projections must be >= 1, got {num_projections}")
        if ridge is not None and not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        if not ridges or any(not lam > 0 for lam in ridges):
            raise ValueError("ridges must be a non-empty sequence of positive values")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.num_projections = num_projections
        self.fixed_ridge = ridge
        self.ridges = tuple(float(lam) for lam in ridges)
        self.val_fraction = val_fraction
        self.selected_ridges: list[float] = []  # lambda used after each task
        self._generator = torch.Generator().manual_seed(seed)
        self._projection: Tensor | None = None  # (D, M) float32
        self._gram = torch.zeros(num_projections, num_projections, dtype=torch.float64)
        self._targets = torch.zeros(num_projections, 0, dtype=torch.float64)  # Q: (M, C)
        self._head = torch.zeros(num_projections, 0, dtype=torch.float64)  # W_o: (M, C)
        self._head32 = self._head.float()

    @property
    def num_classes(self) -> int:
        """Number of classes learned so far."""
        return int(self._targets.shape[1])

    @property
    def head_weights(self) -> Tensor:
        """A copy of the (M, C) float64 head ``W_o = (G + lambda I)^-1 Q``."""
        return self._head.clone()

    def project(self, features: Tensor) -> Tensor:
        """Random ReLU features ``h = ReLU(f @ W)``, (N, M) float32."""
        if self._projection is None:
            raise RuntimeError("RanPAC has not learned any task yet (the projection is drawn at the first learn)")
        feats = _check_features(features, int(self._projection.shape[0]))
        return torch.cat([torch.relu(c @ self._projection) for c in feats.split(_CHUNK_ROWS)])

    def learn(self, features: Tensor, labels: Tensor) -> None:
        """Accumulate the task into ``G`` and ``Q``, pick lambda, re-solve the head (see the module docstring)."""
        dim = None if self._projection is None else int(self._projection.shape[0])
        feats, local, n_new = _check_task(features, labels, self.num_classes, dim)
        if self._projection is None:
            self._projection = torch.randn(feats.shape[1], self.num_projections, generator=self._generator)
        h = self.project(feats)
        new_targets = torch.zeros(n_new, self.num_projections, dtype=torch.float64)
        for rows, cls in zip(h.split(_CHUNK_ROWS), local.split(_CHUNK_ROWS), strict=True):
            rows64 = rows.double()
            self._gram.addmm_(rows64.T, rows64)
            new_targets.index_add_(0, cls, rows64)  # h^T Y with one-hot Y: per-class sums of h
        # Earlier columns of Q get nothing from this task: its samples' targets are 0 there.
        self._targets = torch.cat([self._targets, new_targets.T], dim=1)
        lam = self.fixed_ridge if self.fixed_ridge is not None else self._select_ridge(h, local, n_new)
        self.selected_ridges.append(lam)
        self._head = self._solve(lam)
        self._head32 = self._head.float()

    def predict(self, features: Tensor) -> Tensor:
        """Argmax of the linear head on the random ReLU features (see :class:`IncrementalClassifier`)."""
        if not self.num_classes:
            raise RuntimeError("RanPAC has not learned any class yet")
        h = self.project(features)
        return torch.cat([(c @ self._head32).argmax(dim=1) for c in h.split(_CHUNK_ROWS)])

    def _select_ridge(self, h: Tensor, local: Tensor, n_new: int) -> float:
        """Pick lambda on a random 80/20 split of the current task alone (see the module docstring)."""
        n = h.shape[0]
        n_fit = int(n * (1.0 - self.val_fraction))  # the original: int(N * 0.8) fitting samples
        if n_fit < 1 or n_fit >= n:
            return self.selected_ridges[-1] if self.selected_ridges else 1.0
        perm = torch.randperm(n, generator=self._generator)
        fit, val = perm[:n_fit], perm[n_fit:]
        y = F.one_hot(local, n_new).double()
        # A NaN loss (overflow at a tiny lambda) must never win the argmin.
        losses = ridge_validation_losses(h[fit], y[fit], h[val], y[val], self.ridges).nan_to_num(nan=torch.inf)
        return self.ridges[int(torch.argmin(losses))]  # argmin returns the first minimum, as np.argmin

    def _solve(self, lam: float) -> Tensor:
        """``(G + lam I)^-1 Q`` in float64: Cholesky, with an LU fallback if round-off breaks definiteness."""
        system = self._gram.clone()
        system.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(system)
        head: Tensor
        if int(info) == 0:
            head = torch.cholesky_solve(self._targets, chol)
        else:
            head = torch.linalg.solve(system, self._targets)
        return head
