"""Backbones: the bundled ImageNet default, weight sources, site cuts that match timm, and freezing."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from model.backbone import SiteBackbone, build_backbone, create_timm_model, data_config, make_transform
from model.config import ModelConfig

IMAGENET_CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_bundled_default_is_an_imagenet_classifier() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    model = create_timm_model("efficientnet_lite0", "bundled").eval()
    backbone = build_backbone(ModelConfig(), "bundled")
    cat = Image.fromarray(skimage_data.chelsea()).convert("RGB")
    with torch.no_grad():
        probabilities = model(make_transform(backbone, None)(cat)[None]).softmax(-1)[0]
    assert int(probabilities.argmax()) in IMAGENET_CAT_CLASSES
    assert float(probabilities[list(IMAGENET_CAT_CLASSES)].sum()) > 0.5


def test_preprocessing_comes_from_the_pretrained_config(cnn_backbone: SiteBackbone) -> None:
    config = data_config(cnn_backbone, 96)
    assert config["input_size"] == (3, 96, 96)
    assert tuple(config["mean"]) == pytest.approx((0.485, 0.456, 0.406))
    assert tuple(config["std"]) == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_site_cut_reproduces_timm(kind: str, request: pytest.FixtureRequest) -> None:
    backbone: SiteBackbone = request.getfixturevalue(f"{kind}_backbone")
    config: ModelConfig = request.getfixturevalue(f"{kind}_config")
    size = config.image_size or 224
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = backbone.embed(images)
        for site in range(backbone.num_sites):
            hidden = backbone.forward_site(hidden, site, lambda tokens, routing: torch.zeros_like(tokens))
        ours = backbone.forward_head(hidden)
        timm_features = backbone.model.forward_head(backbone.model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(ours, timm_features, rtol=1e-5, atol=1e-5)


def test_vit_sites_are_every_block_and_cnn_sites_are_configurable(
    vit_backbone: SiteBackbone, cnn_backbone: SiteBackbone
) -> None:
    assert vit_backbone.site_names == [str(i) for i in range(len(vit_backbone.model.blocks))]
    assert cnn_backbone.site_names[-1] == "blocks.6.0"
    custom = build_backbone(ModelConfig(backbone="efficientnet_lite0", sites=("blocks.3.2", "blocks.5.3")), "random")
    assert custom.site_names == ["blocks.3.2", "blocks.5.3"]
    assert custom.site_dims == [80, 192]
    with pytest.raises(ValueError, match="unknown CNN sites"):
        build_backbone(ModelConfig(backbone="efficientnet_lite0", sites=("blocks.9.9",)), "random")


def test_backbone_is_frozen_and_stays_in_eval_mode(cnn_backbone: SiteBackbone) -> None:
    assert all(not p.requires_grad for p in cnn_backbone.parameters())
    cnn_backbone.train()
    assert not any(m.training for m in cnn_backbone.modules())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded_without_network(tmp_path: Path, suffix: str) -> None:
    reference = timm.create_model("test_vit", pretrained=False)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = create_timm_model("test_vit", path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_weight_source_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_timm_model("test_vit", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no bundled weights"):
        create_timm_model("test_vit", "bundled")
    with pytest.raises(ValueError, match="unknown timm model"):
        create_timm_model("not_a_model_xyz", "random")
    with pytest.raises(RuntimeError, match="CARE_BACKBONE_WEIGHTS"):
        create_timm_model("test_vit", "hub")  # HF_HUB_OFFLINE=1 in tests: the hub is unreachable
    with pytest.raises(ValueError, match="CNN families"):
        build_backbone(ModelConfig(backbone="densenet121"), "random")
