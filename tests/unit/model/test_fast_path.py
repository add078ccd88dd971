"""The fast inference path is exact: it matches the reference path and is independent of batch composition."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model.backbone import SiteBackbone
from model.config import ModelConfig
from tests.unit.model.conftest import RandomLineage

BACKBONES = ["vit", "cnn"]


@pytest.fixture
def setup(request: pytest.FixtureRequest) -> tuple[ModelConfig, SiteBackbone]:
    kind = request.param
    return request.getfixturevalue(f"{kind}_config"), request.getfixturevalue(f"{kind}_backbone")


def images(config: ModelConfig, count: int, seed: int = 1) -> torch.Tensor:
    size = config.image_size or 224
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("setup", BACKBONES, indirect=True)
@pytest.mark.parametrize("num_tasks", [1, 2, 5, 30])
def test_fast_equals_reference(
    setup: tuple[ModelConfig, SiteBackbone], num_tasks: int, random_lineage: Callable[..., RandomLineage]
) -> None:
    config, backbone = setup
    lineage = random_lineage(config, backbone, num_tasks)
    batch = images(config, 6)
    fast_selected: list[torch.Tensor] = []
    reference_selected: list[torch.Tensor] = []
    fast = lineage.model.forward_features(batch, lineage.routers, "fast", fast_selected)
    reference = lineage.model.forward_features(batch, lineage.routers, "reference", reference_selected)

    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
    assert len(fast_selected) == backbone.num_sites
    for fast_choice, reference_choice in zip(fast_selected, reference_selected, strict=True):
        assert torch.equal(fast_choice, reference_choice)
    fast_logits = lineage.model.logits(batch, lineage.routers, "fast")
    reference_logits = lineage.model.logits(batch, lineage.routers, "reference")
    assert torch.equal(fast_logits.argmax(1), reference_logits.argmax(1))


@pytest.mark.parametrize("setup", BACKBONES, indirect=True)
def test_batch_equals_samples_one_by_one(
    setup: tuple[ModelConfig, SiteBackbone], random_lineage: Callable[..., RandomLineage]
) -> None:
    config, backbone = setup
    lineage = random_lineage(config, backbone, 12)
    batch = images(config, 8, seed=2)
    selected: list[torch.Tensor] = []
    together = lineage.model.logits(batch, lineage.routers)
    lineage.model.forward_features(batch, lineage.routers, "fast", selected)
    alone = torch.cat([lineage.model.logits(batch[i : i + 1], lineage.routers) for i in range(len(batch))])

    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert torch.equal(together.argmax(1), alone.argmax(1))
    # The batch really mixes tasks: samples chose different routers somewhere.
    assert any(len({tuple(row.tolist()) for row in site}) > 1 for site in selected)


@pytest.mark.parametrize("setup", BACKBONES, indirect=True)
def test_adapters_and_routing_change_the_output(
    setup: tuple[ModelConfig, SiteBackbone], random_lineage: Callable[..., RandomLineage]
) -> None:
    config, backbone = setup
    lineage = random_lineage(config, backbone, 5)
    batch = images(config, 4, seed=3)
    adapted = lineage.model.forward_features(batch, lineage.routers)
    with torch.no_grad():
        plain = backbone.forward_plain(batch)
    assert not torch.allclose(adapted, plain, atol=1e-3)

    # Perturbing one router that samples use changes their features: routers are really consulted.
    selected: list[torch.Tensor] = []
    lineage.model.forward_features(batch, lineage.routers, "fast", selected)
    task = next(int(t) for t in selected[-1][0] if int(t) > 0)  # task 0's router has one expert: nothing to gate
    weight, bias = lineage.routers.routers[task][backbone.num_sites - 1]
    lineage.routers.routers[task] = [
        *lineage.routers.routers[task][:-1],
        (weight + torch.randn_like(weight) * 5, bias),
    ]
    changed = lineage.model.forward_features(batch, lineage.routers)
    assert not torch.allclose(changed[0], adapted[0], atol=1e-5)
