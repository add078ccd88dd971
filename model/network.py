"""CareModel: a frozen backbone, the resident bank of learned tasks and the cosine classifier.

A `CareModel` is immutable once built: learning a task produces a new one. Routers are not part of it; every
forward call receives a `RouterSource`, so one model can be served with any router cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from model.backbone import SiteBackbone, SiteFn
from model.bank import ExpertBank
from model.classifier import class_probabilities, cosine_logits
from model.config import ModelConfig
from model.moe import RoutingOptions, fast_moe, reference_moe
from model.routers import RouterSource

InferencePath = Literal["fast", "reference"]


def run_sites(backbone: SiteBackbone, hidden: Tensor, site_fn: Callable[[int], SiteFn]) -> Tensor:
    """Run the backbone from its embedding through every site to the pooled feature."""
    for site in range(backbone.num_sites):
        hidden = backbone.forward_site(hidden, site, site_fn(site))
    return backbone.forward_head(hidden)


class CareModel:
    """Everything needed to classify images over all learned classes, except the routers.

    Args:
        config: Model configuration.
        backbone: The frozen, site-cut backbone.
        bank: Experts, perceptrons and E_bar of the learned tasks, on the backbone's device.
        classifier: (C, D) cosine classifier weights of all learned classes, task blocks in task order.
    """

    def __init__(self, config: ModelConfig, backbone: SiteBackbone, bank: ExpertBank, classifier: Tensor) -> None:
        if len(bank.sites) != backbone.num_sites:
            raise ValueError(f"bank has {len(bank.sites)} sites, backbone {backbone.num_sites}")
        if classifier.shape[0] != sum(bank.num_classes):
            raise ValueError(f"classifier has {classifier.shape[0]} classes, tasks {sum(bank.num_classes)}")
        self.config = config
        self.backbone = backbone
        self.bank = bank
        self.classifier = classifier

    @property
    def num_tasks(self) -> int:
        return self.bank.num_tasks

    @property
    def num_classes(self) -> int:
        return int(self.classifier.shape[0])

    def _site_fn(self, routers: RouterSource, path: InferencePath, options: RoutingOptions) -> Callable[[int], SiteFn]:
        def for_site(site: int) -> SiteFn:
            bank = self.bank.sites[site]
            if path == "reference":
                return lambda tokens, routing: reference_moe(
                    tokens, routing, bank.experts, bank.perceptrons, bank.shared, site, routers, options
                )
            experts, perceptrons, shared = bank.folded()
            table = bank.perceptron_table()
            return lambda tokens, routing: fast_moe(
                tokens, routing, experts, perceptrons, shared, site, routers, options, table=table
            )

        return for_site

    @torch.inference_mode()
    def forward_features(
        self,
        images: Tensor,
        routers: RouterSource,
        path: InferencePath = "fast",
        selected: list[Tensor] | None = None,
    ) -> Tensor:
        """Pooled features phi(x) (B, D) of preprocessed images (B, 3, H, W), routed without a task id."""
        return self.features_from_embedding(self.backbone.embed(images), routers, path, selected)

    @torch.inference_mode()
    def features_from_embedding(
        self,
        hidden: Tensor,
        routers: RouterSource,
        path: InferencePath = "fast",
        selected: list[Tensor] | None = None,
    ) -> Tensor:
        """Like `forward_features`, from the backbone's output below the first site (`backbone.embed`)."""
        if self.num_tasks == 0:
            raise ValueError("no task has been learned yet: there is nothing to route to")
        options = RoutingOptions(self.config.top_routers, self.config.top_experts, selected=selected)
        return run_sites(self.backbone, hidden, self._site_fn(routers, path, options))

    def logits_from_embedding(self, hidden: Tensor, routers: RouterSource) -> Tensor:
        """Cosine logits (B, C) from `backbone.embed` output, through the fast path."""
        return cosine_logits(self.features_from_embedding(hidden, routers), self.classifier)

    def logits(self, images: Tensor, routers: RouterSource, path: InferencePath = "fast") -> Tensor:
        """Cosine logits (B, C) over all learned classes."""
        return cosine_logits(self.forward_features(images, routers, path), self.classifier)

    def predict_proba(self, images: Tensor, routers: RouterSource, path: InferencePath = "fast") -> Tensor:
        """Probabilities (B, C) over all learned classes; they sum to 1 over every class."""
        return class_probabilities(self.logits(images, routers, path), self.config.cosine_scale)

    def to(self, device: torch.device | str) -> CareModel:
        """This model on another device (the backbone is moved in place; it is shared)."""
        self.backbone.to(device)
        return CareModel(self.config, self.backbone, self.bank.to(device), self.classifier.to(device))
