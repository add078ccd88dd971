"""The provisional path's head algebra: one factorisation gives `solve_head`'s head with the lineage's current
choice of ridge and temperature, and classes added one task at a time give the statistics of adding them all at
once."""

from __future__ import annotations

import torch

from model.head import HeadStatistics, solve_head
from service.training.provisional import add_classes, rebuild, solve_factored


def _task(seed: int, classes: int, per_class: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = torch.randn(classes, dim, generator=generator) * 2
    return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels


def test_one_factorisation_gives_the_head_of_solve_head() -> None:
    dim = 24
    scale = torch.rand(dim) + 0.5
    old, old_labels = _task(0, 3, 6, dim)
    new, new_labels = _task(1, 2, 5, dim)
    statistics = HeadStatistics.empty(dim).add(old * scale, old_labels, 3).add(new * scale, new_labels, 2)
    calibration = (new, new_labels + 3)
    # Without any leave-one-out evidence yet, the previous temperature stays.
    assert solve_factored(statistics, scale, 0.05, calibration, 0.7).temperature == 0.7
    # A trained version adds evidence; the provisional head then uses the same ridge and temperature.
    expected, with_evidence = solve_head(statistics, scale, calibration, None, 0.7)
    got = solve_factored(with_evidence, scale, None, calibration, 0.7)
    torch.testing.assert_close(got.weight, expected.weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.bias, expected.bias, rtol=1e-5, atol=1e-5)
    assert (got.temperature, got.ridge_ratio) == (expected.temperature, expected.ridge_ratio)


def test_adding_tasks_one_by_one_equals_rebuilding_them_together() -> None:
    dim = 16
    scale = torch.rand(dim) + 0.5
    base, base_labels = _task(2, 2, 4, dim)
    trained = HeadStatistics.empty(dim).add(base * scale, base_labels, 2)
    head, trained = solve_head(trained, scale, (base, base_labels), 0.05, 1.0)
    first, first_labels = _task(3, 2, 4, dim)
    second, second_labels = _task(4, 1, 3, dim)
    stepwise, _ = add_classes(trained, head, first, first_labels, 2, 0.05)
    stepwise, stepwise_head = add_classes(stepwise, head, second, second_labels, 1, 0.05)
    together, together_head = rebuild(trained, scale, 1.0, [(first, first_labels, 2), (second, second_labels, 1)], 0.05)
    torch.testing.assert_close(stepwise.gram, together.gram)
    torch.testing.assert_close(stepwise.class_sums, together.class_sums)
    assert stepwise.class_counts.tolist() == [4, 4, 4, 4, 3]
    torch.testing.assert_close(stepwise_head.weight, together_head.weight)
    assert together_head.num_classes == 5
