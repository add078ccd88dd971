"""The GPU path's switches: how a batch reaches the device and how the backbone runs there.

Each switch is its own setting, so that each can be measured alone (`care-bench serve`, `care-bench model` on a
GPU); none changes anything on a CPU unless asked for, and the two that only mean something with CUDA (pinned host
buffers, nvjpeg decoding) are ignored without it:

* pinned host buffers (`CARE_PIN_MEMORY`, on by default, CUDA only): a batch is copied into page-locked memory and
  sent with `non_blocking`, so the copy overlaps the next batch's decoding. The same numbers, bit for bit.
* nvjpeg (`CARE_GPU_DECODE`, off, CUDA only): plain JPEG files are decoded on the GPU by torchvision, and resized
  there. Off until a GPU run shows predictions equal within the decode path's tolerance (2 of 255 levels).
* bf16 autocast (`CARE_PRECISION=bf16`, off): the backbone and the experts in bfloat16, the head's solve and the
  probabilities in float32. Features agree to a cosine of 0.99 with float32 (tests/unit/service/test_acceleration.py);
  whether top-1 agrees closely enough at ViT-B scale needs a GPU run.
* channels-last (`CARE_CHANNELS_LAST`, off): NHWC weights and inputs for convolutional backbones (faster convolutions
  on tensor cores); the same numbers within float rounding.
* torch.compile of the trunk below the first site (`CARE_COMPILE`, off): the trunk is most of the backbone's time
  and has fixed shapes per batch size; the routed sites are data-dependent and stay eager. Compiling takes tens of
  seconds at start-up (during warm-up, before the server reports ready).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from model.backbone import SiteBackbone
from service.settings import Settings

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class Acceleration:
    """Resolved switches for one device (see the module docstring); `Acceleration(device)` is the plain path."""

    device: torch.device
    precision: Precision = "fp32"
    channels_last: bool = False
    compile_trunk: bool = False
    pin_memory: bool = False
    gpu_decode: bool = False

    @classmethod
    def resolve(
        cls,
        device: torch.device,
        *,
        precision: Precision = "fp32",
        channels_last: bool = False,
        compile_trunk: bool = False,
        pin_memory: bool = False,
        gpu_decode: bool = False,
    ) -> Acceleration:
        """The switches as they apply on `device`: pinned memory and nvjpeg only with CUDA."""
        cuda = device.type == "cuda"
        if gpu_decode and not cuda:
            logger.info("CARE_GPU_DECODE is ignored: the model runs on %s, not CUDA", device)
        return cls(
            device=device,
            precision=precision,
            channels_last=channels_last,
            compile_trunk=compile_trunk,
            pin_memory=pin_memory and cuda,
            gpu_decode=gpu_decode and cuda,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Acceleration:
        return cls.resolve(
            settings.torch_device(),
            precision=settings.precision,
            channels_last=settings.channels_last,
            compile_trunk=settings.compile,
            pin_memory=settings.pin_memory,
            gpu_decode=settings.gpu_decode,
        )

    @property
    def decode_device(self) -> torch.device | None:
        """Where JPEG files are decoded, when not on the CPU."""
        return self.device if self.gpu_decode else None

    def prepare(self, backbone: SiteBackbone) -> None:
        """Apply the backbone's switches in place (once, before serving)."""
        if self.channels_last:
            backbone.to(memory_format=torch.channels_last)
        if self.compile_trunk:
            # The instance attribute shadows the method: every caller of `embed` gets the compiled trunk.
            backbone.embed = torch.compile(backbone.embed, dynamic=True)  # type: ignore[method-assign]

    def inputs(self, batch: Tensor) -> Tensor:
        """A preprocessed batch (B, 3, H, W) as the model takes it: on the device, in its memory format."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.pin_memory and batch.device.type == "cpu":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The context a forward pass runs in: bf16 autocast, or nothing."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
