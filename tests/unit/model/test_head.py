"""The analytic head: closed form against a direct solve, exact accumulation, leave-one-out scores, calibration."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from model.head import (
    TEMPERATURE_GRID,
    AnalyticHead,
    HeadStatistics,
    block_scales,
    fit_temperature,
    head_inputs,
    solve_head,
)

RIDGE = 0.1


def blobs(classes: int, per_class: int, dim: int, seed: int, spread: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * spread
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels


def direct_lda(inputs: torch.Tensor, labels: torch.Tensor, ridge_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook LDA with one pooled covariance, from every sample at once."""
    x = inputs.double()
    classes = int(labels.max()) + 1
    means = torch.stack([x[labels == c].mean(0) for c in range(classes)])
    centred = x - means[labels]
    scatter = centred.T @ centred / len(x)
    scatter += ridge_ratio * scatter.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(scatter, means.T)
    return weight, -0.5 * (means * weight.T).sum(1)


def test_accumulated_task_by_task_equals_a_direct_solve_on_all_data() -> None:
    inputs, labels = blobs(5, 12, 8, seed=0)
    statistics = HeadStatistics.empty(8)
    # Tasks of 2, 1 and 2 classes (a one-class task among them), local labels 0..n-1 each.
    for first, count in ((0, 2), (2, 1), (3, 2)):
        rows = (labels >= first) & (labels < first + count)
        statistics = statistics.add(inputs[rows], labels[rows] - first, count)
    weight, bias = statistics.solve(RIDGE)
    expected_weight, expected_bias = direct_lda(inputs, labels, RIDGE)
    # Equal up to the 1e-9 floor the head adds to its ridge (so that a scatter of zeros stays invertible).
    torch.testing.assert_close(weight, expected_weight, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(bias, expected_bias, rtol=1e-7, atol=1e-7)
    assert statistics.class_counts.tolist() == [12] * 5


def test_leave_one_out_scores_equal_a_refit_without_the_image() -> None:
    inputs, labels = blobs(3, 6, 5, seed=1)
    statistics = HeadStatistics.empty(5).add(inputs, labels, 3)
    scores, kept = statistics.leave_one_out_scores(RIDGE, inputs, labels)
    assert torch.equal(kept, labels)
    full = statistics.scatter(RIDGE)
    ridge = float(full[0, 0] - ((statistics.gram - statistics.means().T @ statistics.class_sums) / 18)[0, 0])
    x = inputs.double()
    for i in (0, 7, 17):
        others = torch.arange(18) != i
        # The head fitted on the 17 other images, with the full fit's ridge.
        means = torch.stack([x[others & (labels == c)].mean(0) for c in range(3)])
        centred = x[others] - means[labels[others]]
        scatter = centred.T @ centred / 17 + ridge * torch.eye(5, dtype=torch.float64)
        weight = torch.linalg.solve(scatter, means.T)
        expected = x[i] @ weight - 0.5 * (means * weight.T).sum(1)
        torch.testing.assert_close(scores[i], expected, rtol=1e-9, atol=1e-9)


def test_leave_one_out_is_not_the_optimism_of_scoring_training_images() -> None:
    # More dimensions than images: the fitted head separates its own training images perfectly, left-out ones not.
    generator = torch.Generator().manual_seed(6)
    inputs, labels = torch.randn(20, 50, generator=generator), torch.arange(20) % 2  # no signal at all
    statistics = HeadStatistics.empty(50).add(inputs, labels, 2)
    weight, bias = statistics.solve(0.01)
    fitted = float(((inputs.double() @ weight + bias).argmax(1) == labels).float().mean())
    scores, kept = statistics.leave_one_out_scores(0.01, inputs, labels)
    left_out = float((scores.argmax(1) == kept).float().mean())
    assert fitted == 1.0 and left_out <= 0.7


def test_single_image_classes_are_left_out_of_calibration_and_keep_the_previous_temperature() -> None:
    inputs, labels = blobs(2, 1, 4, seed=2)
    statistics = HeadStatistics.empty(4).add(inputs, labels, 2)
    scores, kept = statistics.leave_one_out_scores(RIDGE, inputs, labels)
    assert len(kept) == 0 and scores.shape == (0, 2)
    head, after = solve_head(statistics, torch.ones(4), (inputs, labels), RIDGE, previous_temperature=0.7)
    assert head.temperature == 0.7 and torch.equal(after.selection, statistics.selection)
    assert head.scores(inputs).argmax(1).tolist() == [0, 1]


def test_temperature_minimises_the_negative_log_likelihood_on_the_grid() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (200,), generator=generator)
    # Scores that are right 70 % of the time with a margin of 1: the best temperature is neither end of the grid.
    noisy = torch.where(torch.rand(200, generator=generator) < 0.7, labels, (labels + 1) % 4)
    scores = F.one_hot(noisy, 4).double()
    chosen = fit_temperature(scores, labels)
    losses = {t: float(F.cross_entropy(scores / t, labels)) for t in TEMPERATURE_GRID}
    assert chosen == min(losses, key=lambda t: losses[t])
    assert TEMPERATURE_GRID[0] < chosen < TEMPERATURE_GRID[-1]


def test_probabilities_sum_to_one_and_tensors_round_trip() -> None:
    inputs, labels = blobs(3, 5, 6, seed=4)
    scale = block_scales(inputs, [4, 2])
    statistics = HeadStatistics.empty(6).add(inputs * scale, labels, 3)
    head, statistics = solve_head(statistics, scale, (inputs, labels), RIDGE)
    probabilities = head.probabilities(inputs)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(15))
    restored = AnalyticHead.from_tensors(head.to_tensors(), 3, "test")
    torch.testing.assert_close(restored.scores(inputs), head.scores(inputs))
    assert restored.temperature == head.temperature
    with pytest.raises(ValueError, match="does not fit 4 classes"):
        AnalyticHead.from_tensors(head.to_tensors(), 4, "test")
    round_tripped = HeadStatistics.from_tensors(statistics.to_tensors())
    assert torch.equal(round_tripped.gram, statistics.gram)
    assert torch.equal(round_tripped.selection, statistics.selection) and bool((statistics.selection > 0).any())


def test_block_scales_weigh_every_block_alike_and_inputs_power_normalise_phi() -> None:
    phi = torch.tensor([[4.0, -9.0]])
    site = torch.tensor([[1.0, 2.0, 3.0]])
    inputs = head_inputs(phi, [site])
    assert inputs.tolist() == [[2.0, -3.0, 1.0, 2.0, 3.0]]
    scaled = torch.cat([inputs, inputs * 10]) * block_scales(torch.cat([inputs, inputs * 10]), [2, 3])
    rms = [float(block.square().mean().sqrt()) for block in scaled.split([2, 3], dim=1)]
    assert rms == pytest.approx([1.0, 1.0])


def test_bad_labels_are_refused() -> None:
    inputs, labels = blobs(2, 3, 4, seed=5)
    with pytest.raises(ValueError, match="one label in 0..0"):
        HeadStatistics.empty(4).add(inputs, labels, 1)
    with pytest.raises(ValueError, match="at least one image"):
        HeadStatistics.empty(4).add(inputs[:3], labels[:3], 2)


def test_ridge_and_temperature_are_chosen_by_the_accumulated_leave_one_out_likelihood() -> None:
    # Few noisy images in many dimensions want a strong ridge (nearest mean); many images in few dimensions, whose
    # noise is strongly correlated, a weak one (the full Mahalanobis metric).
    for (per_class, dim, spread), ridge in (((4, 60, 0.5), 3.0), ((80, 4, 2.0), 0.01)):
        inputs, labels = blobs(4, per_class, dim, seed=7, spread=spread)
        if dim == 4:
            mixing = [[1.0, 0.9, 0.0, 0.0], [0.0, 0.3, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.1]]
            inputs = inputs @ torch.tensor(mixing)
        statistics = HeadStatistics.empty(dim)
        for first in (0, 2):  # two tasks of two classes: evidence accumulates
            rows = (labels >= first) & (labels < first + 2)
            statistics = statistics.add(inputs[rows], labels[rows] - first, 2)
            head, statistics = solve_head(statistics, torch.ones(dim), (inputs[rows], labels[rows]))
        assert head.ridge_ratio == ridge, (per_class, dim, head.ridge_ratio)
        assert statistics.choice() == (head.ridge_ratio, head.temperature)
