"""Where the BR-MoE forward pass gets task routers from.

Routers are the one part of a task that is not kept resident: per site, task t's router has `dim x t` weights,
so routers grow quadratically with the number of tasks while a request needs only M of them per site. The model
therefore asks a `RouterSource` for one task's routers at a time and holds them only while it computes that
task's gates; the serving side implements the source with a byte-capped LRU cache, training and tests with
`ResidentRouters`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import Tensor

# Per site: (weight (t, d), bias (t,)) of one task's router, t = 1-based task number.
TaskRouters = Sequence[tuple[Tensor, Tensor]]


class RouterSource(Protocol):
    """Gives access to a task's routers (every site) for the duration of a `with` block."""

    def hold(self, task: int) -> AbstractContextManager[TaskRouters]:
        """Routers of 0-based task `task`, valid (and never evicted) until the block exits."""
        ...


class ResidentRouters:
    """All routers in memory, for training and tests: `routers[task][site] = (weight, bias)`."""

    def __init__(self, routers: Sequence[TaskRouters] = ()) -> None:
        self.routers: list[TaskRouters] = list(routers)

    @contextmanager
    def hold(self, task: int) -> Iterator[TaskRouters]:
        if not 0 <= task < len(self.routers):
            raise KeyError(f"no router for task {task}; {len(self.routers)} tasks are resident")
        yield self.routers[task]

    def with_task(self, routers: TaskRouters) -> ResidentRouters:
        """A new source with one more task's routers; this one is unchanged."""
        return ResidentRouters([*self.routers, routers])

    def to(self, device: torch.device | str) -> ResidentRouters:
        """Every router on `device` (offline benchmarks and probes; the server's cache places its own)."""
        return ResidentRouters([[(w.to(device), b.to(device)) for w, b in task] for task in self.routers])
