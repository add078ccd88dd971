"""Routing decisions: entropy with padding, router selection, grouped router evaluation, gate forms."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from model.routers import ResidentRouters, TaskRouters
from model.routing import dense_gates, entropy, router_logits, select_routers, sparse_gates


def test_entropy_ignores_padded_classes() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    padded = torch.tensor([[1.0, 2.0, 0.5, float("-inf"), float("-inf")]])
    torch.testing.assert_close(entropy(logits), entropy(padded))
    uniform = torch.zeros(1, 4)
    torch.testing.assert_close(entropy(uniform), torch.tensor([torch.log(torch.tensor(4.0)).item()]), atol=1e-6, rtol=0)


def test_select_routers_picks_lowest_entropy_and_forces_the_training_task() -> None:
    entropies = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.05, 0.6]])
    assert select_routers(entropies, 2).tolist() == [[1, 3], [2, 0]]
    # Learning task 3: the forced router plus the single lowest-entropy earlier one (task 3's own entropy unused).
    assert select_routers(entropies, 2, forced_task=3).tolist() == [[1, 3], [2, 3]]
    assert select_routers(entropies[:, :1], 2, forced_task=0).tolist() == [[0], [0]]
    assert select_routers(entropies[:, :1], 2).tolist() == [[0], [0]]  # M > T: all routers


class CountingRouters(ResidentRouters):
    def __init__(self, routers: list[TaskRouters]) -> None:
        super().__init__(routers)
        self.holds: list[int] = []

    @contextmanager
    def hold(self, task: int) -> Iterator[TaskRouters]:
        self.holds.append(task)
        with super().hold(task) as routers:
            yield routers


def test_router_logits_match_a_naive_loop_and_fetch_each_task_once() -> None:
    generator = torch.Generator().manual_seed(0)
    num_tasks, dim, batch = 6, 5, 7
    routers = CountingRouters(
        [[(torch.randn(t + 1, dim, generator=generator), torch.randn(t + 1, generator=generator))] for t in range(6)]
    )
    inputs = torch.randn(num_tasks, batch, dim, generator=generator)
    selected = torch.randint(0, num_tasks, (batch, 2), generator=generator)
    logits = router_logits(inputs, selected, num_tasks, 0, routers)
    for b in range(batch):
        for m in range(2):
            task = int(selected[b, m])
            weight, bias = routers.routers[task][0]
            expected = inputs[task, b] @ weight.T + bias
            torch.testing.assert_close(logits[b, m, : task + 1], expected)
            assert torch.isinf(logits[b, m, task + 1 :]).all()
    assert sorted(routers.holds) == sorted(set(selected.flatten().tolist()))


def test_sparse_gates_equal_dense_gates_up_to_the_masked_tail() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 2, 8, generator=generator)
    logits[0, 1, 2:] = float("-inf")  # a router that sees only two experts (fewer than K)
    indices, weights = sparse_gates(logits, 3)
    scattered = torch.zeros(4, 8).scatter_add_(1, indices, weights)
    torch.testing.assert_close(scattered, dense_gates(logits, 3), atol=1e-30, rtol=1e-6)
    assert torch.allclose(weights.reshape(4, 2, 3).sum(-1), torch.ones(4, 2))
    assert scattered[0].count_nonzero() <= 5


def test_resident_routers_move_every_tensor_and_leave_the_source_unchanged() -> None:
    routers = ResidentRouters([[(torch.randn(t + 1, 4), torch.randn(t + 1)) for _ in range(3)] for t in range(2)])
    moved = routers.to("meta")  # a device with no data: any tensor left behind would still say "cpu"
    assert [[(w.device.type, b.device.type) for w, b in task] for task in moved.routers] == [[("meta", "meta")] * 3] * 2
    assert [[tuple(w.shape) for w, _ in task] for task in moved.routers] == [[(1, 4)] * 3, [(2, 4)] * 3]
    with routers.hold(1) as original:
        assert all(w.device.type == "cpu" for w, _ in original)
