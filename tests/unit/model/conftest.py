"""Fixtures for the model core: tiny real backbones and random-weight task lineages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from model import artifacts
from model.backbone import SiteBackbone, build_backbone
from model.config import ModelConfig
from model.network import CareModel
from model.routers import ResidentRouters
from model.synthetic import random_shared, random_task


@dataclass
class RandomLineage:
    """A CareModel of random tasks with its routers in memory."""

    model: CareModel
    routers: ResidentRouters


@pytest.fixture(scope="session")
def vit_config() -> ModelConfig:
    return ModelConfig(backbone="test_vit", image_size=32)


@pytest.fixture(scope="session")
def vit_backbone(vit_config: ModelConfig) -> SiteBackbone:
    torch.manual_seed(0)
    return build_backbone(vit_config, "random")


@pytest.fixture(scope="session")
def cnn_config() -> ModelConfig:
    return ModelConfig(backbone="efficientnet_lite0", image_size=64)


@pytest.fixture(scope="session")
def cnn_backbone(cnn_config: ModelConfig) -> SiteBackbone:
    return build_backbone(cnn_config, "bundled")


def make_random_lineage(
    config: ModelConfig, backbone: SiteBackbone, num_tasks: int, classes_per_task: int = 3, seed: int = 0
) -> RandomLineage:
    """`num_tasks` random tasks stored and reloaded through the artifact key scheme, as a server would."""
    generator = torch.Generator().manual_seed(seed)
    shared = artifacts.shared_tensors(random_shared(config, backbone.site_dims, generator))
    experts, routers = [], []
    for index in range(num_tasks):
        task = random_task(config, backbone.site_dims, index, classes_per_task, generator)
        experts.append((artifacts.task_expert_tensors(task), classes_per_task))
        router_tensors = artifacts.task_router_tensors(task)
        routers.append(artifacts.routers_from_tensors(router_tensors, index, backbone.site_dims, f"task {index}"))
    bank = artifacts.stack_tasks(shared, experts, config, backbone.site_dims)
    classifier = torch.randn(num_tasks * classes_per_task, backbone.feature_dim, generator=generator)
    return RandomLineage(CareModel(config, backbone, bank, classifier), ResidentRouters(routers))


@pytest.fixture
def random_lineage() -> Callable[..., RandomLineage]:
    return make_random_lineage
