"""The backbone's evaluation transform on decoded uint8 tensors instead of PIL images.

timm builds the evaluation transform as a torchvision `Compose` over a PIL image (resize the short side, centre
crop, to float, normalise). torchvision's antialiased resize of a uint8 tensor follows Pillow's resampling, so the
same steps on a (3, H, W) uint8 tensor give nearly the same tensor (at most 2 of 255 levels on a pixel, 0.013 on
average, measured in tests/unit/service/test_tensor_decode.py) at a fraction of the cost, and let the decoding be
done by libjpeg-turbo/libpng through `torchvision.io` without building a PIL image (service/inference/preprocess.py).

Only the steps below are translated; a transform with any other step (a training transform, a custom backbone
config) gets no tensor version and callers keep the PIL path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import transforms
from torchvision.transforms.v2 import functional as F

TensorTransform = Callable[[Tensor], Tensor]


def _resize(step: transforms.Resize) -> TensorTransform:
    size, interpolation, max_size = step.size, step.interpolation, step.max_size

    def resize(image: Tensor) -> Tensor:
        resized: Tensor = F.resize(image, size, interpolation=interpolation, max_size=max_size, antialias=True)
        return resized

    return resize


def _centre_crop(step: transforms.CenterCrop) -> TensorTransform:
    size = list(step.size)

    def crop(image: Tensor) -> Tensor:
        cropped: Tensor = F.center_crop(image, size)
        return cropped

    return crop


def _to_float(image: Tensor) -> Tensor:
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got {image.dtype}")
    return image.float().div(255)  # what ToTensor does with 8-bit pixels


def _normalise(step: transforms.Normalize) -> TensorTransform:
    mean, std = list(step.mean), list(step.std)

    def normalise(image: Tensor) -> Tensor:
        normalised: Tensor = F.normalize(image, mean, std)
        return normalised

    return normalise


def _translate(step: Any) -> TensorTransform | None:
    if isinstance(step, transforms.Resize) and step.antialias is not False:
        return _resize(step)
    if isinstance(step, transforms.CenterCrop):
        return _centre_crop(step)
    if isinstance(step, transforms.ToTensor) or type(step).__name__ == "MaybeToTensor":
        return _to_float
    if isinstance(step, transforms.Normalize) and not step.inplace:
        return _normalise(step)
    return None


def tensor_transform(pil_transform: Any) -> TensorTransform | None:
    """The same transform on a (3, H, W) uint8 RGB tensor, or None when a step has no tensor version here."""
    steps: Sequence[Any] = pil_transform.transforms if isinstance(pil_transform, transforms.Compose) else []
    translated = [_translate(step) for step in steps]
    if not translated or any(step is None for step in translated) or _to_float not in translated:
        return None
    chain = [step for step in translated if step is not None]

    def apply(image: Tensor) -> Tensor:
        for step in chain:
            image = step(image)
        return image

    return apply
