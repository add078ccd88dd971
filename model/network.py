"""CareModel: a frozen backbone, the resident bank of learned tasks and the served head.

A `CareModel` is immutable once built: learning a task produces a new one. Routers are not part of it; every
forward call receives a `RouterSource`, so one model can be served with any router cache. The served head is the
analytic head (model/head.py) when the version has one, else CaRE's cosine classifier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor

from model.backbone import SiteBackbone, SiteFn
from model.bank import ExpertBank
from model.classifier import class_probabilities, cosine_logits
from model.config import ModelConfig
from model.head import AnalyticHead, head_inputs
from model.moe import RoutingOptions, fast_moe, reference_moe
from model.routers import RouterSource

InferencePath = Literal["fast", "reference"]


def run_sites(
    backbone: SiteBackbone,
    hidden: Tensor,
    site_fn: Callable[[int], SiteFn],
    site_vectors: list[Tensor] | None = None,
) -> Tensor:
    """Run the backbone from its embedding through every site to the pooled feature.

    When `site_vectors` is given, the pooled input of every site (the vector its routers read) is appended to it.
    """
    for site in range(backbone.num_sites):
        moe = site_fn(site)
        if site_vectors is not None:
            moe = _recording(moe, site_vectors)
        hidden = backbone.forward_site(hidden, site, moe)
    return backbone.forward_head(hidden)


@contextlib.contextmanager
def _float32(inputs: Tensor) -> Iterator[Tensor]:
    """The head in float32 even under a caller's bf16 autocast (the GPU path): its LDA weights span a range that
    bfloat16's 8-bit mantissa would round into different rankings."""
    with torch.autocast(inputs.device.type, enabled=False):
        yield inputs.float()


class ServedHead:
    """The head half of a method's network (MoRAM's, SETA's): scores and probabilities of the head's inputs.

    The served analytic head when the version has one, else the cosine classifier at the configuration's scale;
    in float32 even under a caller's bf16 autocast. Subclasses set `config`, `classifier` and `head`.
    """

    config: ModelConfig
    classifier: Tensor
    head: AnalyticHead | None

    @property
    def num_classes(self) -> int:
        return int(self.classifier.shape[0]) if self.head is None else self.head.num_classes

    def scores(self, inputs: Tensor) -> Tensor:
        """The served head's scores (B, C)."""
        with _float32(inputs) as inputs32:
            if self.head is not None:
                return self.head.scores(inputs32)
            return self.config.cosine_scale * cosine_logits(inputs32, self.classifier)

    def probabilities(self, inputs: Tensor) -> Tensor:
        """The served head's probabilities (B, C); each row sums to 1 over every class."""
        with _float32(inputs) as inputs32:
            if self.head is not None:
                return self.head.probabilities(inputs32)
            return class_probabilities(cosine_logits(inputs32, self.classifier), self.config.cosine_scale)


def _recording(moe: SiteFn, vectors: list[Tensor]) -> SiteFn:
    def run(tokens: Tensor, routing: Tensor) -> Tensor:
        vectors.append(routing)
        return moe(tokens, routing)

    return run


class CareModel:
    """Everything needed to classify images over all learned classes, except the routers.

    Args:
        config: Model configuration.
        backbone: The frozen, site-cut backbone.
        bank: Experts, perceptrons and E_bar of the learned tasks, on the backbone's device.
        classifier: (C, D) cosine classifier weights of all learned classes, task blocks in task order.
        head: The analytic head over the same classes, possibly followed by head-only classes (provisional classes
            that have no experts yet); when given it is what `logits` and `predict_proba` use.
    """

    def __init__(
        self,
        config: ModelConfig,
        backbone: SiteBackbone,
        bank: ExpertBank,
        classifier: Tensor,
        head: AnalyticHead | None = None,
    ) -> None:
        if len(bank.sites) != backbone.num_sites:
            raise ValueError(f"bank has {len(bank.sites)} sites, backbone {backbone.num_sites}")
        if classifier.shape[0] != sum(bank.num_classes):
            raise ValueError(f"classifier has {classifier.shape[0]} classes, tasks {sum(bank.num_classes)}")
        # A head may cover classes beyond the bank's (head-only, provisional classes: they come last and change
        # no routing); the cosine classifier covers exactly the bank's.
        if head is not None and head.num_classes < classifier.shape[0]:
            raise ValueError(f"head has {head.num_classes} classes, classifier {classifier.shape[0]}")
        self.config = config
        self.backbone = backbone
        self.bank = bank
        self.classifier = classifier
        self.head = head

    @property
    def num_tasks(self) -> int:
        return self.bank.num_tasks

    @property
    def num_classes(self) -> int:
        """Classes the served head scores: the bank's, plus any head-only classes of the analytic head."""
        return int(self.classifier.shape[0]) if self.head is None else self.head.num_classes

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

    @torch.inference_mode()
    def head_inputs_from_embedding(self, hidden: Tensor, routers: RouterSource, path: InferencePath = "fast") -> Tensor:
        """What the served head reads: analytic-head inputs (`model.head.head_inputs`), or phi for the cosine head."""
        if self.head is None:
            return self.features_from_embedding(hidden, routers, path)
        return head_inputs(*self.features_and_site_vectors(hidden, routers, path))

    @torch.inference_mode()
    def features_and_site_vectors(
        self, hidden: Tensor, routers: RouterSource, path: InferencePath = "fast"
    ) -> tuple[Tensor, list[Tensor]]:
        """phi (B, D) and the pooled input of every site (what the analytic head reads besides phi)."""
        if self.num_tasks == 0:
            raise ValueError("no task has been learned yet: there is nothing to route to")
        options = RoutingOptions(self.config.top_routers, self.config.top_experts)
        vectors: list[Tensor] = []
        features = run_sites(self.backbone, hidden, self._site_fn(routers, path, options), vectors)
        return features, vectors

    def scores(self, inputs: Tensor) -> Tensor:
        """The served head's scores (B, C) of its inputs: LDA scores, or cosines without an analytic head."""
        with _float32(inputs) as inputs32:
            if self.head is not None:
                return self.head.scores(inputs32)
            return cosine_logits(inputs32, self.classifier)

    def probabilities(self, inputs: Tensor) -> Tensor:
        """The served head's probabilities (B, C) of its inputs; each row sums to 1 over every class."""
        with _float32(inputs) as inputs32:
            if self.head is not None:
                return self.head.probabilities(inputs32)
            return class_probabilities(cosine_logits(inputs32, self.classifier), self.config.cosine_scale)

    def logits_from_embedding(self, hidden: Tensor, routers: RouterSource) -> Tensor:
        """Scores (B, C) from `backbone.embed` output, through the fast path."""
        return self.scores(self.head_inputs_from_embedding(hidden, routers))

    @torch.inference_mode()
    def logits(self, images: Tensor, routers: RouterSource, path: InferencePath = "fast") -> Tensor:
        """Scores (B, C) over all learned classes (argmax = the prediction)."""
        return self.scores(self.head_inputs_from_embedding(self.backbone.embed(images), routers, path))

    @torch.inference_mode()
    def predict_proba(self, images: Tensor, routers: RouterSource, path: InferencePath = "fast") -> Tensor:
        """Probabilities (B, C) over all learned classes; they sum to 1 over every class."""
        return self.probabilities(self.head_inputs_from_embedding(self.backbone.embed(images), routers, path))

    def to(self, device: torch.device | str) -> CareModel:
        """This model on another device (the backbone is moved in place; it is shared)."""
        self.backbone.to(device)
        head = None if self.head is None else self.head.to(device)
        return CareModel(self.config, self.backbone, self.bank.to(device), self.classifier.to(device), head)
