"""Folding a frozen CNN's batch norms into its convolutions: the same features, fewer operations, and a check
that refuses a fold which changed the numbers."""

from __future__ import annotations

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import model.backbone as backbone_module
from model.backbone import SiteBackbone
from model.fusion import count_foldable, fold_batch_norms


def _randomised(norm: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A norm with non-trivial statistics and affine parameters, in eval mode (as a frozen backbone's are)."""
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
        norm.running_var.uniform_(0.5, 2)  # type: ignore[union-attr]
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm.eval()


def test_a_conv_and_its_norm_fold_into_the_conv_and_the_activation_stays() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        _randomised(BatchNormAct2d(8, act_layer=nn.ReLU6)),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise, with a bias of its own
        _randomised(nn.BatchNorm2d(8)),
    ).eval()
    x = torch.randn(2, 3, 9, 9)
    expected = block(x)
    assert count_foldable(block) == 2 and isinstance(block[1], BatchNormAct2d)  # counting changes nothing
    assert fold_batch_norms(block) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    assert isinstance(block[1], nn.ReLU6) and isinstance(block[3], nn.Identity)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_a_norm_in_training_mode_or_after_something_else_is_left_alone() -> None:
    training = nn.Sequential(nn.Conv2d(3, 4, 1), _randomised(nn.BatchNorm2d(4)).train())
    after_a_pool = nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(2), _randomised(nn.BatchNorm2d(4)))
    assert fold_batch_norms(training) == 0 and fold_batch_norms(after_a_pool) == 0


def test_the_served_cnn_backbone_folds_with_the_same_features_on_both_paths(cnn_backbone: SiteBackbone) -> None:
    folded = cnn_backbone.with_folded_batch_norms(64)
    assert folded is not cnn_backbone
    assert any(isinstance(m, nn.BatchNorm2d) for m in cnn_backbone.modules())  # the original is untouched
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # The served path runs the modules it listed at construction: they must be the folded ones now.
    assert not any(isinstance(m, nn.BatchNorm2d) for _, module in folded.sequence for m in module.modules())  # type: ignore[attr-defined]
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(folded.forward_plain(x), cnn_backbone.forward_plain(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(folded._served_unadapted(x), cnn_backbone._served_unadapted(x), rtol=1e-4, atol=1e-4)


def test_a_fold_that_changes_the_features_is_refused(
    cnn_backbone: SiteBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong_fold(module: nn.Module) -> int:
        first = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            first.weight.mul_(2.0)
        return 1

    monkeypatch.setattr(backbone_module, "fold_batch_norms", wrong_fold)
    assert cnn_backbone.with_folded_batch_norms(64) is cnn_backbone


def test_a_vit_has_nothing_to_fold(vit_backbone: SiteBackbone) -> None:
    assert vit_backbone.with_folded_batch_norms(32) is vit_backbone
