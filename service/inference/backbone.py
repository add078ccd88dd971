"""The frozen backbone as this deployment configures it: built once by the server and once by the worker."""

from __future__ import annotations

import dataclasses

from model.backbone import SiteBackbone, build_backbone
from model.config import ModelConfig
from service.settings import Settings


def resolved_model_config(settings: Settings, backbone: SiteBackbone) -> ModelConfig:
    """The settings' model config with defaults made explicit (sites, image size).

    A registry records the explicit form, so it keeps loading even if a later release changes a default.
    """
    size = settings.image_size or int(backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return dataclasses.replace(settings.model(), sites=tuple(backbone.site_names), image_size=size)


def load_backbone(settings: Settings, fold: bool = True) -> tuple[ModelConfig, SiteBackbone]:
    """Build the frozen backbone on the configured device; returns it with the resolved model config.

    With `fold` (what the server and the worker run), a CNN's batch norms are folded into its convolutions once a
    probe batch shows the same features within 1e-4 (`SiteBackbone.with_folded_batch_norms`): EfficientNet-Lite0's
    forward pass takes about 0.7x the time on a CPU. `fold=False` gives timm's model as built (benchmarks' reference).
    """
    device = settings.torch_device()
    backbone = build_backbone(settings.model(), settings.backbone_weights).to(device)
    config = resolved_model_config(settings, backbone)
    if fold:
        backbone = backbone.with_folded_batch_norms(config.image_size or 224)
    return config, backbone
