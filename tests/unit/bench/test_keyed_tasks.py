"""The serve bench's keyed tasks: task t's perceptrons answer key image t, wherever the routing is computed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from bench.synthetic import key_images, keyed_learned_tasks
from model.backbone import build_backbone
from model.config import ModelConfig
from registry import Registry
from service.modelstore import ModelStore


def test_keyed_tasks_are_the_same_when_their_routing_is_computed_on_another_device(tmp_path: Path) -> None:
    config = ModelConfig(backbone="test_vit")
    backbone = build_backbone(config, "random")
    config = dataclasses.replace(config, sites=tuple(backbone.site_names))
    store = ModelStore(Registry.from_path(tmp_path), config, backbone, torch.device("cpu"))
    keys = key_images(4, int(backbone.pretrained_cfg["input_size"][-1]))
    # The device path copies the backbone and the routers and moves the bank site by site; on the CPU it must give
    # the in-place path's perceptrons exactly (a GPU gives them within float rounding).
    here = keyed_learned_tasks(store, keys, 2, torch.Generator().manual_seed(0))
    copied = keyed_learned_tasks(store, keys, 2, torch.Generator().manual_seed(0), device=torch.device("cpu"))
    for a, b in zip(here, copied, strict=True):
        for site in range(a.task.num_sites):
            weight = a.task.perceptron(site).linear.weight
            torch.testing.assert_close(weight, b.task.perceptron(site).linear.weight, rtol=0, atol=0)
            assert weight[0].abs().sum() > 0  # keyed: the first class's row is set to the key's routing
