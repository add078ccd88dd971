"""Cosine classifier over all learned classes (CaRE section 1.6).

One block of class weights per task, concatenated; logits are cosines between the feature and each class
weight, and the scale tau is applied only in losses and when turning logits into probabilities.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def cosine_logits(features: Tensor, weight: Tensor) -> Tensor:
    """cos(theta) between features (B, D) and class weights (C, D) -> (B, C)."""
    return F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).T


def class_probabilities(cosines: Tensor, scale: float) -> Tensor:
    """Probabilities over all learned classes: softmax(scale * cos), as the model was trained."""
    return (scale * cosines).softmax(dim=-1)
