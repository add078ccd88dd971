"""Image preprocessing: `Preprocessor` decodes uploads and applies the backbone's transform (the server and the
worker both use it); `PreprocessPool` runs it for /predict on a small pool of threads that each use a single
torch thread.

Why not `anyio.to_thread`: its pool grows to 40 threads, and torch ops in a thread that never chose a thread count
(to-tensor and normalisation are big enough to go parallel) run on an OpenMP team of the last count set anywhere in
the process, the inference thread's. Under load many such teams spin on the cores the inference team needs, and the
inference slows to half its speed. A few single-threaded workers decode the next requests on whatever the inference
leaves free.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from model.tensor_transform import TensorTransform, tensor_transform
from service.errors import ApiError, api_error
from service.inference.acceleration import Acceleration
from service.ingest.images import decode_image, decode_image_tensor
from service.ingest.limits import UploadLimits

Files = Sequence[tuple[str, bytes]]


class Preprocessor:
    """Decodes uploaded images and applies the backbone's evaluation transform (CPU-bound: run off the event loop).

    When the transform has a tensor version (model/tensor_transform.py) and `tensor_path` is on, images are decoded
    to uint8 tensors and resized on tensors, without PIL images: the same output within 2 of 255 levels on a pixel
    (tests/unit/service/test_tensor_decode.py), at a fraction of the cost; otherwise every image takes the PIL path.
    """

    def __init__(
        self,
        transform: Callable[[Image.Image], Tensor],
        limits: UploadLimits,
        device: torch.device,
        tensor_path: bool = True,
        acceleration: Acceleration | None = None,
    ):
        self.transform = transform
        self.limits = limits
        self.device = device
        self.tensor_transform: TensorTransform | None = tensor_transform(transform) if tensor_path else None
        self.acceleration = acceleration
        # nvjpeg: JPEG files decoded (and then resized) on the GPU; only on the tensor path.
        self.decode_device = acceleration.decode_device if acceleration and self.tensor_transform else None

    def _one(self, name: str, data: bytes) -> Tensor:
        if self.tensor_transform is not None:
            return self.tensor_transform(decode_image_tensor(name, data, self.limits, self.decode_device))
        return self.transform(decode_image(name, data, self.limits))

    def __call__(self, files: Sequence[tuple[str, bytes]]) -> Tensor:
        problems: list[dict[str, Any]] = []
        tensors: list[Tensor] = []
        for index, (name, data) in enumerate(files):
            try:
                tensors.append(self._one(name, data))
            except ApiError as error:
                if error.status == 413:
                    raise
                problems.append({"index": index, "name": name, "reason": error.message})
        if problems:
            raise api_error(
                "invalid_image",
                message=f"{len(problems)} of {len(files)} images could not be decoded; send PNG, JPEG, WebP, GIF, BMP "
                "or TIFF images",
                details={"images": problems},
            )
        batch = torch.stack([t.to(self.device) for t in tensors]) if self.decode_device else torch.stack(tensors)
        return self.acceleration.inputs(batch) if self.acceleration is not None else batch.to(self.device)


def _single_torch_thread() -> None:
    torch.set_num_threads(1)


def default_workers() -> int:
    """One decoding thread per CPU this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


class PreprocessPool:
    """Runs `preprocess` off the event loop on `workers` threads.

    Args:
        preprocess: Decodes and transforms uploaded files into a (n, 3, H, W) tensor; raises ApiError on bad input.
        workers: Threads.
    """

    def __init__(self, preprocess: Callable[[Files], Tensor], workers: int) -> None:
        self._preprocess = preprocess
        self._workers = workers
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="care-decode", initializer=_single_torch_thread
        )

    async def run(self, files: Files) -> Tensor:
        """The preprocessed images of `files`; a request of several images is split across the workers, so that
        its decoding, which the inference has to wait for, takes a fraction of the time."""
        loop = asyncio.get_running_loop()
        chunks = min(self._workers, len(files))
        if chunks <= 1:
            return await loop.run_in_executor(self._executor, self._preprocess, files)
        step = -(-len(files) // chunks)
        parts = [files[start : start + step] for start in range(0, len(files), step)]
        try:
            tensors = await asyncio.gather(*(loop.run_in_executor(self._executor, self._preprocess, p) for p in parts))
        except ApiError:
            # A part's error numbers the images within that part: decode the whole request once more so the error
            # gives every bad image its index in the request (bad requests are rare; the second pass is cheap).
            return await loop.run_in_executor(self._executor, self._preprocess, files)
        return torch.cat(tensors)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
