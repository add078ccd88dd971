"""The request path's decode and preprocess, PIL against tensors (issue 17): time per image and what it changes.

Encodes real images the way clients send them, then runs the server's `Preprocessor` both ways (`tensor_path`
off: Pillow decode + timm's PIL transform; on: torchvision.io decode + the same transform on uint8 tensors),
interleaved, one torch thread, and reports the median milliseconds per image of each and their ratio. It then
feeds both outputs to EfficientNet-Lite0 with its bundled ImageNet weights and reports how many top-1 ImageNet
predictions agree and the largest logit difference: the backbone's answer, not a toy's.

    PYTHONPATH=. .venv/bin/python tools/probe_decode.py --images 200 --out docs/bench/decode_probe.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.datasets import load_fashion_mnist
from model.backbone import WEIGHTS_BUNDLED, create_timm_model
from service.inference.preprocess import Preprocessor
from service.ingest.limits import UploadLimits


def encoded(images: np.ndarray, size: int, fmt: str) -> list[bytes]:
    """Fashion-MNIST images as RGB files of `size` px (bicubic upscale), encoded as `fmt`."""
    out = []
    for pixels in images:
        image = Image.fromarray(pixels).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buffer.getvalue())
    return out


def timed(preprocess: Preprocessor, files: list[tuple[str, bytes]]) -> float:
    started = time.perf_counter()
    for file in files:
        preprocess([file])
    return (time.perf_counter() - started) / len(files) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = create_timm_model("efficientnet_lite0", WEIGHTS_BUNDLED).eval()
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    limits, cpu = UploadLimits(), torch.device("cpu")
    pil = Preprocessor(transform, limits, cpu, tensor_path=False)
    tensors = Preprocessor(transform, limits, cpu, tensor_path=True)
    images, _labels = load_fashion_mnist("test")
    picked = images[: args.images]
    sets = {
        "png 28 px (grey source, as stored)": encoded(picked, 28, "PNG"),
        "png 224 px": encoded(picked, 224, "PNG"),
        "jpeg 224 px": encoded(picked, 224, "JPEG"),
        "jpeg 1024 px": encoded(picked[: max(1, args.images // 4)], 1024, "JPEG"),
    }
    rows: list[dict[str, Any]] = []
    for name, data in sets.items():
        files = [(f"{i}", blob) for i, blob in enumerate(data)]
        pil_ms, tensor_ms = [], []
        for _ in range(args.repeats):
            pil_ms.append(timed(pil, files))
            tensor_ms.append(timed(tensors, files))
        with torch.inference_mode():
            a, b = pil(files), tensors(files)
            logits_a = torch.cat([model(a[i : i + 32]) for i in range(0, len(a), 32)])
            logits_b = torch.cat([model(b[i : i + 32]) for i in range(0, len(b), 32)])
        std = torch.as_tensor(transform.transforms[-1].std).view(1, 3, 1, 1)
        levels = ((a - b) * std * 255).abs()
        rows.append(
            {
                "images": name,
                "count": len(files),
                "pil_ms_per_image": round(statistics.median(pil_ms), 3),
                "tensor_ms_per_image": round(statistics.median(tensor_ms), 3),
                "speedup": round(statistics.median(p / t for p, t in zip(pil_ms, tensor_ms, strict=True)), 2),
                "max_pixel_levels": round(float(levels.max()), 3),
                "mean_pixel_levels": round(float(levels.mean()), 4),
                "top1_agreement": round(float((logits_a.argmax(1) == logits_b.argmax(1)).float().mean()), 4),
                "max_logit_difference": round(float((logits_a - logits_b).abs().max()), 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)  # noqa: T201 - the probe's output
    result = {
        "command": "PYTHONPATH=. .venv/bin/python tools/probe_decode.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, torch {torch.__version__}",
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
