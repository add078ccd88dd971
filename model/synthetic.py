"""Random task weights, for tests and benchmarks that need many tasks without training them.

Trained adapters start with a zero output scale; random ones here get non-zero scales and perceptrons with
spread-out logits so that routing decisions are real (not ties) and every expert changes the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.adapter import Adapter, TaskModules, adapters, shared_experts
from model.bank import AdapterStack
from model.config import ModelConfig
from model.head import AnalyticHead
from model.seta import SetaBank


def _randomize_adapter(adapter: Adapter, generator: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for param in (adapter.down.weight, adapter.up.weight):
            param.normal_(0.0, 1.0 / param.shape[1] ** 0.5, generator=generator)
        for param in (adapter.down.bias, adapter.up.bias, adapter.norm.bias):
            param.normal_(0.0, 0.1, generator=generator)
        adapter.norm.weight.normal_(1.0, 0.1, generator=generator)
        adapter.scale.normal_(0.0, scale, generator=generator)


def random_task(
    config: ModelConfig,
    site_dims: Sequence[int],
    task_index: int,
    num_classes: int,
    generator: torch.Generator,
    expert_scale: float = 0.2,
) -> TaskModules:
    """A task with random (non-trivial) experts, perceptrons and routers."""
    task = TaskModules(list(site_dims), config.expert_dim, config.expert_dropout, num_classes, task_index)
    with torch.no_grad():
        for site in range(task.num_sites):
            perceptron, router = task.perceptron(site), task.router(site)
            _randomize_adapter(task.expert(site), generator, expert_scale)
            perceptron.norm.weight.normal_(1.0, 0.2, generator=generator)
            perceptron.norm.bias.normal_(0.0, 0.1, generator=generator)
            perceptron.linear.weight.normal_(0.0, 1.0 / perceptron.linear.weight.shape[1] ** 0.5, generator=generator)
            perceptron.linear.bias.normal_(0.0, 0.5, generator=generator)
            router.weight.normal_(0.0, 1.0, generator=generator)
            router.bias.normal_(0.0, 0.5, generator=generator)
    return task.eval()


def random_shared(
    config: ModelConfig, site_dims: Sequence[int], generator: torch.Generator, expert_scale: float = 0.2
) -> nn.ModuleList:
    """E_bar of every site with random weights."""
    shared = shared_experts(list(site_dims), config.shared_dim, config.expert_dropout)
    for adapter in adapters(shared):
        _randomize_adapter(adapter, generator, expert_scale)
    return shared.eval()


def synthetic_head(config: ModelConfig, classifier: Tensor, site_dims: Sequence[int]) -> AnalyticHead | None:
    """An analytic head that scores like the given cosine rows (on the phi block only), or None for the cosine head.

    Random tasks have no statistics to solve a head from; this one keeps versions of random tasks loadable and
    their predictions spread over every class.
    """
    if config.head != "analytic":
        return None
    num_classes = classifier.shape[0]
    weight = torch.cat([F.normalize(classifier, dim=1).T, torch.zeros(sum(site_dims), num_classes)])
    scale = torch.ones(weight.shape[0])
    return AnalyticHead(scale, weight.contiguous(), torch.zeros(num_classes), 1.0 / config.cosine_scale)


def random_seta_bank(
    config: ModelConfig, site_dims: Sequence[int], num_tasks: int, generator: torch.Generator
) -> SetaBank:
    """A SETA bank of `num_tasks` random unique experts and gate rows around random shared experts."""
    shared = [AdapterStack.from_modules([a]).detach() for a in adapters(random_shared(config, site_dims, generator))]
    bank = SetaBank.start(shared, config.expert_dim)
    for index in range(num_tasks):
        task = random_task(config, site_dims, index, 1, generator)
        unique = [AdapterStack.from_modules([task.expert(s)]).detach() for s in range(task.num_sites)]
        gates = [torch.randn(1, dim, generator=generator) for dim in site_dims]
        bank = bank.append(unique, gates)
    return bank
