"""The inference-time perceptron table equals LayerNorm(c_t) followed by the folded perceptron, task by task."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from model.adapter import LAYER_NORM_EPS
from model.bank import FoldedAdapters, FoldedPerceptrons, PerceptronTable


def _random_site(
    tasks: int, rank: int, dim: int, classes: int, offset: float
) -> tuple[FoldedAdapters, FoldedPerceptrons]:
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    experts = FoldedAdapters(
        down_weight=rand(tasks, rank, dim),
        down_bias=rand(tasks, rank),
        up_weight=rand(tasks, rank, dim) * 0.1,
        # A large common offset: LayerNorm removes it, a naive E[c^2] - mean^2 variance would not survive it.
        up_bias=rand(tasks, dim) + offset,
    )
    bias = rand(tasks, classes)
    bias[0, -1] = float("-inf")  # task 0 has one class fewer (padding)
    return experts, FoldedPerceptrons(weight=rand(tasks, dim, classes), bias=bias)


def _explicit_logits(experts: FoldedAdapters, perceptrons: FoldedPerceptrons, hidden: torch.Tensor) -> torch.Tensor:
    routing_inputs = torch.baddbmm(experts.up_bias[:, None, :], hidden, experts.up_weight)  # (T, B, d)
    normalised = F.layer_norm(routing_inputs, routing_inputs.shape[-1:], eps=LAYER_NORM_EPS)
    return torch.baddbmm(perceptrons.bias[:, None, :], normalised, perceptrons.weight)


def test_table_logits_equal_the_explicit_computation() -> None:
    for offset in (0.0, 50.0):
        experts, perceptrons = _random_site(tasks=7, rank=16, dim=96, classes=4, offset=offset)
        hidden = torch.relu(torch.randn(7, 5, 16, generator=torch.Generator().manual_seed(1)))
        expected = _explicit_logits(experts, perceptrons, hidden)
        actual = PerceptronTable.build(experts, perceptrons).logits(hidden)
        assert torch.equal(torch.isinf(actual), torch.isinf(expected))
        finite = torch.isfinite(expected)
        torch.testing.assert_close(actual[finite], expected[finite], atol=1e-4, rtol=1e-4)
