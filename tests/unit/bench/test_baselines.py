"""Tests of the feature-level CIL baselines (SimpleCIL, RanPAC) and the benchmark metrics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from bench.baselines import DEFAULT_RIDGES, IncrementalClassifier, RanPAC, SimpleCIL, ridge_validation_losses
from bench.metrics import (
    AccuracyMatrix,
    StageResult,
    average_incremental_accuracy,
    evaluate_stage,
    forgetting,
    last_accuracy,
)

torch.set_num_threads(1)


def gaussian_clusters(num_classes: int, per_class: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """Well-separated isotropic clusters (sorted by class): prototypes separate them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 3.0
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + 0.5 * torch.randn(labels.numel(), dim, generator=g), labels


def antipodal_clusters(num_classes: int, per_class: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """Each class is two clusters at +mu_c and -mu_c (multi-class XOR): every class mean is ~0, so prototypes fail,
    but |mu_c . x| = ReLU(mu_c . x) + ReLU(-mu_c . x) is linear in random ReLU features."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.nn.functional.normalize(
        torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)), dim=1
    )
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    signs = torch.tensor([1.0, -1.0]).repeat(labels.numel() // 2 + 1)[: labels.numel()]
    feats = 4.0 * signs[:, None] * mu[labels] + 0.3 * torch.randn(labels.numel(), dim, generator=g)
    return feats, labels


def learn_in_tasks(model: IncrementalClassifier, feats: Tensor, labels: Tensor, sizes: list[int]) -> None:
    start = 0
    for size in sizes:
        mask = (labels >= start) & (labels < start + size)
        model.learn(feats[mask], labels[mask])
        start += size


def accuracy(model: IncrementalClassifier, feats: Tensor, labels: Tensor) -> float:
    return float((model.predict(feats) == labels).float().mean())


def test_both_satisfy_protocol() -> None:
    assert isinstance(SimpleCIL(), IncrementalClassifier)
    assert isinstance(RanPAC(16), IncrementalClassifier)


def test_simplecil_near_perfect_and_independent_of_task_split() -> None:
    train_x, train_y = gaussian_clusters(10, 40, 16, seed=0)
    test_x, test_y = gaussian_clusters(10, 30, 16, seed=1)
    preds = []
    for sizes in ([10], [5, 5], [2, 2, 2, 2, 2], [3, 1, 6]):
        model = SimpleCIL()
        learn_in_tasks(model, train_x, train_y, sizes)
        assert model.num_classes == 10
        assert accuracy(model, test_x, test_y) > 0.98
        preds.append(model.predict(test_x))
    # Final prototypes are per-class means, so the increment only changes the intermediate stages.
    assert all(torch.equal(p, preds[0]) for p in preds[1:])
    torch.testing.assert_close(model.prototypes[7], train_x[train_y == 7].mean(0))


def test_learn_rejects_out_of_order_or_incomplete_classes() -> None:
    x, y = gaussian_clusters(4, 5, 8, seed=0)
    for model in (SimpleCIL(), RanPAC(32)):
        with pytest.raises(ValueError, match="new classes"):
            model.learn(x[y >= 1], y[y >= 1])  # class 0 skipped
        model.learn(x[y < 2], y[y < 2])
        with pytest.raises(ValueError, match="new classes"):
            model.learn(x, y)  # old classes again
        with pytest.raises(ValueError, match="dimension"):
            model.learn(x[y >= 2, :4], y[y >= 2])
        with pytest.raises(RuntimeError):
            type(model)().predict(x)


def test_ranpac_accumulation_is_exact() -> None:
    x, y = antipodal_clusters(6, 40, 12, seed=0)
    incremental, joint = RanPAC(256, seed=3, ridge=10.0), RanPAC(256, seed=3, ridge=10.0)
    learn_in_tasks(incremental, x, y, [2, 1, 3])
    joint.learn(x, y)
    assert incremental.num_classes == joint.num_classes == 6
    assert incremental.selected_ridges == [10.0, 10.0, 10.0]
    torch.testing.assert_close(incremental.head_weights, joint.head_weights, rtol=1e-7, atol=1e-10)
    # ...and both equal the closed form on all data at once.
    h = joint.project(x).double()
    y1 = torch.nn.functional.one_hot(y, 6).double()
    expected = torch.linalg.solve(h.T @ h + 10.0 * torch.eye(256, dtype=torch.float64), h.T @ y1)
    torch.testing.assert_close(joint.head_weights, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("n_fit", [30, 90])  # SVD path (n_fit <= M) and Gram eigendecomposition path
def test_ridge_validation_losses_match_direct_solves(n_fit: int) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.relu(torch.randn(n_fit + 20, 48, generator=g, dtype=torch.float64))
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (n_fit + 20,), generator=g), 3).double()
    ridges = (1e-3, 1e-1, 1.0, 10.0, 1e3)
    losses = ridge_validation_losses(h[:n_fit], y[:n_fit], h[n_fit:], y[n_fit:], ridges)
    gram, q = h[:n_fit].T @ h[:n_fit], h[:n_fit].T @ y[:n_fit]
    for lam, loss in zip(ridges, losses, strict=True):
        w = torch.linalg.solve(gram + lam * torch.eye(48, dtype=torch.float64), q)
        torch.testing.assert_close(loss, (h[n_fit:] @ w - y[n_fit:]).square().mean(), rtol=1e-6, atol=1e-12)


def test_ranpac_beats_simplecil_when_prototypes_fail() -> None:
    train_x, train_y = antipodal_clusters(6, 120, 16, seed=0)
    test_x, test_y = antipodal_clusters(6, 60, 16, seed=1)
    simple, ranpac = SimpleCIL(), RanPAC(512, seed=0)
    for model in (simple, ranpac):
        learn_in_tasks(model, train_x, train_y, [2, 2, 2])
    assert len(ranpac.selected_ridges) == 3 and all(lam in DEFAULT_RIDGES for lam in ranpac.selected_ridges)
    assert accuracy(simple, test_x, test_y) < 0.5
    assert accuracy(ranpac, test_x, test_y) > 0.95


def test_ranpac_deterministic_under_seed() -> None:
    x, y = antipodal_clusters(4, 30, 8, seed=2)
    a, b, c = RanPAC(128, seed=7), RanPAC(128, seed=7), RanPAC(128, seed=8)
    for model in (a, b, c):
        learn_in_tasks(model, x, y, [2, 2])
    assert a.selected_ridges == b.selected_ridges
    assert torch.equal(a.head_weights, b.head_weights)
    assert torch.equal(a.predict(x), b.predict(x))
    assert not torch.equal(a.project(x), c.project(x))


def test_metrics_on_hand_made_matrix() -> None:
    task_acc = [[0.9], [0.8, 0.7], [0.6, 0.75, 0.5]]
    overall = [0.9, 0.75, 0.6]
    assert last_accuracy(overall) == pytest.approx(0.6)
    assert average_incremental_accuracy(overall) == pytest.approx(0.75)
    # f_0 = max(0.9, 0.8) - 0.6 = 0.3; f_1 = 0.7 - 0.75 = -0.05 (not clamped); mean = 0.125.
    assert forgetting(task_acc) == pytest.approx(0.125)
    assert forgetting([[0.9]]) == 0.0
    matrix = AccuracyMatrix()
    for row, all_seen in zip(task_acc, overall, strict=True):
        matrix.append(StageResult(task_accuracy=tuple(row), overall=all_seen))
    assert matrix.summary() == pytest.approx(
        {"last_accuracy": 0.6, "average_incremental_accuracy": 0.75, "forgetting": 0.125}
    )
    with pytest.raises(ValueError):
        matrix.append(StageResult(task_accuracy=(0.5,), overall=0.5))  # stage 3 must report 4 tasks
    with pytest.raises(ValueError):
        forgetting([[0.9], [0.8]])


def test_evaluate_stage_and_json_round_trip() -> None:
    def predict(feats: Tensor) -> Tensor:
        return feats[:, 0].long()  # the "model" predicts whatever column 0 says

    feats = [torch.tensor([[0.0], [1.0], [1.0], [1.0]]), torch.tensor([[2.0], [3.0]])]
    labels = [torch.tensor([0, 1, 0, 1]), torch.tensor([2, 3])]
    row = evaluate_stage(predict, feats, labels, batch_size=3)
    assert row.task_accuracy == (0.75, 1.0)
    assert row.overall == pytest.approx(5 / 6)  # sample-weighted over the union, not the mean of tasks
    assert row.num_samples == (4, 2)
    matrix = AccuracyMatrix([evaluate_stage(predict, feats[:1], labels[:1]), row])
    restored = AccuracyMatrix.from_dict(json.loads(json.dumps(matrix.to_dict())))
    assert restored == matrix
    assert restored.forgetting == pytest.approx(0.0)
    assert StageResult.from_dict(json.loads(json.dumps(row.to_dict()))) == row
