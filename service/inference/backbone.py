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


def load_backbone(settings: Settings) -> tuple[ModelConfig, SiteBackbone]:
    """Build the frozen backbone on the configured device; returns it with the resolved model config."""
    backbone = build_backbone(settings.model(), settings.backbone_weights)
    backbone.to(settings.torch_device())
    return resolved_model_config(settings, backbone), backbone
