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
from model.network import CareModel
from model.routers import ResidentRouters
from service.inference.acceleration import Acceleration
from service.ingest.images import decode_image_tensor
from service.ingest.limits import UploadLimits


def variants(device: torch.device, chosen: list[str] | None = None) -> dict[str, Acceleration]:
    """Each switch alone and all together (`chosen`: a subset by name; "plain" is always kept as the reference).
    The CUDA-only settings (pinned host buffers, and "all", which includes them) are skipped on a CPU."""
    options: dict[str, dict[str, Any]] = {
        "plain": {},
        "bf16": {"precision": "bf16"},
        "channels_last": {"channels_last": True},
        "compile": {"compile_trunk": True},
        "pinned": {"pin_memory": True},
        "all": {"precision": "bf16", "channels_last": True, "compile_trunk": True, "pin_memory": True},
    }
    if chosen:
        unknown = set(chosen) - set(options)
        if unknown:
            raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(options)}")
        options = {name: values for name, values in options.items() if name == "plain" or name in chosen}
    if device.type != "cuda":
        options = {name: values for name, values in options.items() if name not in ("pinned", "all")}
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
    chosen = [name for name in args.variants.split(",") if name] if args.variants else None
    # The tasks are drawn once (ViT-B's routers at 300 tasks are 1.7 GB); each variant gets a backbone of its own,
    # since its switches change the backbone in place.
    base, routers = random_model(config, build_backbone(config, weights), args.tasks, device=device)
    for label, acceleration in variants(device, chosen).items():
        backbone = build_backbone(config, weights).to(device)
        network = CareModel(config, backbone, base.bank, base.classifier, base.head)
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
    if device.type == "cuda":
        results["cuda_correctness"] = cuda_correctness(config, weights, batch, served["plain"][:2], device)
    for label in served:
        out = call(label).float().cpu()
        results.setdefault("variants", {})[label] = {
            "median_ms": round(1000 * statistics.median(times[label]), 3),
            "over_plain": round(statistics.median(times[label]) / statistics.median(times["plain"]), 3),
            "top1_agreement": float((out.argmax(1) == reference.argmax(1)).float().mean()),
            "max_probability_difference": float((out - reference).abs().max()),
        }
    return results


def agreement(out: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    out, reference = out.float().cpu(), reference.float().cpu()
    return {
        "top1_agreement": float((out.argmax(1) == reference.argmax(1)).float().mean()),
        "max_abs_difference": float((out - reference).abs().max()),
    }


def cuda_correctness(
    config: ModelConfig,
    weights: str,
    batch: torch.Tensor,
    plain: tuple[CareModel, ResidentRouters],
    device: torch.device,
) -> dict[str, Any]:
    """The plain fp32 path on CUDA against the same model on the CPU (probabilities), and the fast path against the
    reference path on CUDA (head inputs: the routed features), on the same batch."""
    network, routers = plain
    with torch.inference_mode():
        on_cuda = network.predict_proba(batch.to(device), routers)
        fast = network.head_inputs_from_embedding(network.backbone.embed(batch.to(device)), routers, "fast")
        reference = network.head_inputs_from_embedding(network.backbone.embed(batch.to(device)), routers, "reference")
    cpu = torch.device("cpu")
    head = None if network.head is None else network.head.to(cpu)
    cpu_network = CareModel(
        config, build_backbone(config, weights), network.bank.to(cpu), network.classifier.cpu(), head
    )
    cpu_routers = routers.to(cpu)
    with torch.inference_mode():
        on_cpu = cpu_network.predict_proba(batch, cpu_routers)
    return {
        "cuda_vs_cpu_probabilities": agreement(on_cuda, on_cpu),
        "fast_vs_reference_head_inputs_max_abs_difference": float((fast - reference).abs().max()),
        "head_inputs_max_abs": float(reference.abs().max()),
    }


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
    parser.add_argument("--variants", default="", help="a subset of the switch settings (default: all of them)")
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
