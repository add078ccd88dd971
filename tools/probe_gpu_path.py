"""The GPU path's switches, each alone and all together (issue 17): batch time and what each changes. A probe for a
machine with CUDA (the `device` tool); on a CPU it runs the CPU-meaningful switches only.

For each backbone it builds the served network (`bench.model_bench.random_model`: random tasks, analytic head), then
times one batch through the served call (`ServedVersion.probabilities`' path: inputs to the device, autocast, fast
path, head) under each switch setting, interleaved, and reports the median ms and top-1 agreement / largest
probability difference against the plain fp32 path on the same inputs. With CUDA it also decodes JPEG files with
nvjpeg and with libjpeg-turbo and reports the largest pixel difference and ms per image of each.

    PYTHONPATH=. python tools/probe_gpu_path.py --backbones vit_base_patch16_224,efficientnet_lite0 --tasks 300 \\
        --out /tmp/gpu_path.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.model_bench import random_model
from model.backbone import build_backbone, bundled_weights_available
from model.config import ModelConfig
from service.inference.acceleration import Acceleration
from service.ingest.images import decode_image_tensor
from service.ingest.limits import UploadLimits


def variants(device: torch.device) -> dict[str, Acceleration]:
    cuda = device.type == "cuda"
    options: dict[str, dict[str, Any]] = {
        "plain": {},
        "bf16": {"precision": "bf16"},
        "channels_last": {"channels_last": True},
        "compile": {"compile_trunk": True},
    }
    if cuda:
        options["pinned"] = {"pin_memory": True}
        options["all"] = {"precision": "bf16", "channels_last": True, "compile_trunk": True, "pin_memory": True}
    return {name: Acceleration.resolve(device, **values) for name, values in options.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_backbone(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    config = ModelConfig(backbone=name)
    weights = "bundled" if bundled_weights_available(name) else "random"
    results: dict[str, Any] = {"backbone": name, "weights": weights, "tasks": args.tasks, "batch": args.batch}
    probe = build_backbone(config, weights)
    size = int(probe.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    config = dataclasses.replace(config, sites=tuple(probe.site_names), image_size=size)
    batch = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    served: dict[str, tuple[Any, Any, Acceleration]] = {}
    for label, acceleration in variants(device).items():
        torch.manual_seed(0)
        backbone = build_backbone(config, weights).to(device)
        network, routers = random_model(config, backbone, args.tasks)
        network = network.to(device)
        routers = routers.to(device) if hasattr(routers, "to") else routers
        started = time.perf_counter()
        acceleration.prepare(backbone)
        served[label] = (network, routers, acceleration)
        with torch.inference_mode(), acceleration.autocast():
            network.predict_proba(acceleration.inputs(batch), routers)  # warm-up (and compile)
        sync(device)
        results.setdefault("prepare_seconds", {})[label] = round(time.perf_counter() - started, 2)

    def call(label: str) -> torch.Tensor:
        network, routers, acceleration = served[label]
        with torch.inference_mode(), acceleration.autocast():
            out = network.predict_proba(acceleration.inputs(batch), routers)
        sync(device)
        return out

    times: dict[str, list[float]] = {label: [] for label in served}
    for _ in range(args.repeats):
        for label in served:  # interleaved: drift hits every variant alike
            started = time.perf_counter()
            call(label)
            times[label].append(time.perf_counter() - started)
    reference = call("plain").float().cpu()
    for label in served:
        out = call(label).float().cpu()
        results.setdefault("variants", {})[label] = {
            "median_ms": round(1000 * statistics.median(times[label]), 3),
            "over_plain": round(statistics.median(times[label]) / statistics.median(times["plain"]), 3),
            "top1_agreement": float((out.argmax(1) == reference.argmax(1)).float().mean()),
            "max_probability_difference": float((out - reference).abs().max()),
        }
    return results


def probe_nvjpeg(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    limits = UploadLimits()
    files = []
    for index in range(args.jpegs):
        pixels = (rng.random((args.jpeg_size // 8, args.jpeg_size // 8, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((args.jpeg_size, args.jpeg_size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        files.append((f"image-{index}.jpg", buffer.getvalue()))
    cpu_ms, gpu_ms, worst = [], [], 0
    for name, data in files:
        started = time.perf_counter()
        on_cpu = decode_image_tensor(name, data, limits)
        cpu_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        on_gpu = decode_image_tensor(name, data, limits, device)
        sync(device)
        gpu_ms.append(1000 * (time.perf_counter() - started))
        worst = max(worst, int((on_gpu.cpu().int() - on_cpu.int()).abs().max()))
    return {
        "images": len(files),
        "size": args.jpeg_size,
        "cpu_ms_median": round(statistics.median(cpu_ms), 3),
        "nvjpeg_ms_median": round(statistics.median(gpu_ms), 3),
        "max_pixel_difference": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="efficientnet_lite0")
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--jpegs", type=int, default=50)
    parser.add_argument("--jpeg-size", type=int, default=1024)
    parser.add_argument("--out", default="gpu_path.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "backbones": [probe_backbone(name, args, device) for name in args.backbones.split(",")],
    }
    if device.type == "cuda":
        report["nvjpeg"] = probe_nvjpeg(args, device)
    with open(args.out, "w") as out:
        json.dump(report, out, indent=2)
    print(json.dumps(report, indent=2))  # noqa: T201 - the probe's output


if __name__ == "__main__":
    main()
