"""Trainable per-task modules: expert adapters, class perceptrons and task routers (CaRE sections 1.2-1.3).

These are the modules of the task being learned. Once a task is trained its tensors move into an immutable
`ExpertBank` (experts, perceptrons) and a router store; inference never runs these modules directly.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, used by every LayerNorm of the task modules


class Adapter(nn.Module):
    """AdaptFormer-style bottleneck adapter with a learnable per-channel output scale.

    `Adapter(x) = s * (W_up Dropout(ReLU(W_down LN(x) + b_down)) + b_up)`; `s` starts at zero so a new expert
    adds nothing until it has learned something. Returns the delta only (no residual). Token-wise: (..., d).
    """

    def __init__(self, dim: int, bottleneck: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)
        # CaRE: kaiming_uniform(a=sqrt(5)) weights (PyTorch's Linear default) and zero biases.
        for linear in (self.down, self.up):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.scale * self.up(self.dropout(F.relu(self.down(self.norm(x))))))


class Perceptron(nn.Module):
    """Class perceptron C_t: LayerNorm + Linear to the task's classes (CaRE's code form of the paper's rho_t)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(dim, num_classes)
        # NOTE: CaRE's code applies trunc_normal_(std=.02) to the LayerNorm *gamma* (index quirk in
        # `latent_head[-1][0]`), so perceptrons start with nearly flat logits. We keep that behaviour.
        nn.init.trunc_normal_(self.norm.weight, std=0.02)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))  # type: ignore[no-any-return]


def new_router(dim: int, num_experts: int) -> nn.Linear:
    """Task router R_t: a linear gate over the experts of tasks 1..t (trunc_normal .02 weights, zero bias)."""
    router = nn.Linear(dim, num_experts)
    nn.init.trunc_normal_(router.weight, std=0.02)
    nn.init.zeros_(router.bias)
    return router


class TaskModules(nn.Module):
    """The trainable modules of one task across all sites: E_t, C_t and R_t per site."""

    def __init__(self, site_dims: list[int], expert_dim: int, dropout: float, num_classes: int, task_index: int):
        super().__init__()
        self.task_index = task_index
        self.num_classes = num_classes
        self.experts = nn.ModuleList(Adapter(d, expert_dim, dropout) for d in site_dims)
        self.perceptrons = nn.ModuleList(Perceptron(d, num_classes) for d in site_dims)
        # Router of 0-based task i gates experts 0..i.
        self.routers = nn.ModuleList(new_router(d, task_index + 1) for d in site_dims)

    # Typed views of the module lists (nn.ModuleList indexes as a plain Module).
    def expert(self, site: int) -> Adapter:
        return cast(Adapter, self.experts[site])

    def perceptron(self, site: int) -> Perceptron:
        return cast(Perceptron, self.perceptrons[site])

    def router(self, site: int) -> nn.Linear:
        return cast(nn.Linear, self.routers[site])

    @property
    def num_sites(self) -> int:
        return len(self.experts)


def shared_experts(site_dims: list[int], shared_dim: int, dropout: float) -> nn.ModuleList:
    """The shared expert E_bar, one per site, trained with the first task."""
    return nn.ModuleList(Adapter(d, shared_dim, dropout) for d in site_dims)


def adapters(modules: nn.ModuleList) -> list[Adapter]:
    """A module list of adapters, typed."""
    return [cast(Adapter, m) for m in modules]
