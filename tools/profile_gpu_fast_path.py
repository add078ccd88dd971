"""Where a served batch's time goes on a GPU (issue 17): torch.profiler over the served call (fast path + head) and
over the backbone alone, at one task count per backbone. Reports wall ms per call, the GPU's busy ms per call (sum of
kernel times), kernel launches per call and the top operators by CPU and by CUDA time. For the `device` tool:

    PYTHONPATH=. python tools/profile_gpu_fast_path.py --backbones efficientnet_lite0:300,vit_base_patch16_224:100 \\
        --out profile.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from bench.model_bench import random_model, time_call
from model.backbone import build_backbone, bundled_weights_available
from model.config import ModelConfig


def profiled(call: Callable[[], object], calls: int) -> tuple[float, float, float, str, str]:
    """(wall ms per call, kernel ms per call, kernels per call, top ops by CPU, top ops by CUDA)."""
    walls = [time_call(call) for _ in range(calls)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.device_time for e in kernels) / 1000 / calls
    averages = prof.key_averages()
    by_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=15)
    by_cuda = averages.table(sort_by="self_device_time_total", row_limit=15)
    return 1000 * statistics.median(walls), kernel_ms, len(kernels) / calls, by_cpu, by_cuda


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="efficientnet_lite0:300")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", default="profile.txt")
    args = parser.parse_args()
    device = torch.device("cuda")
    lines = [f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}"]
    for spec in args.backbones.split(","):
        name, _, count = spec.partition(":")
        tasks = int(count or 300)
        config = ModelConfig(backbone=name)
        weights = "bundled" if bundled_weights_available(name) else "random"
        backbone = build_backbone(config, weights)
        size = int(backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        config = dataclasses.replace(config, sites=tuple(backbone.site_names), image_size=size)
        model, routers = random_model(config, backbone, tasks, device=device)
        images = torch.randn(args.batch, 3, size, size, device=device)
        with torch.inference_mode():
            for _ in range(5):
                model.predict_proba(images, routers)
                backbone.forward_plain(images)
            for label, call in (
                ("backbone alone", lambda b=backbone, x=images: b.forward_plain(x)),
                ("served (fast path + head)", lambda m=model, x=images, r=routers: m.predict_proba(x, r)),
            ):
                wall, busy, launches, by_cpu, by_cuda = profiled(call, args.calls)
                lines += [
                    f"\n## {name}, {tasks} tasks: {label}",
                    f"wall {wall:.2f} ms per call, GPU kernels {busy:.2f} ms per call ({busy / wall:.0%} busy), "
                    f"{launches:.0f} kernel launches per call",
                    "### by self CPU time",
                    by_cpu,
                    "### by self CUDA time",
                    by_cuda,
                ]
                print(lines[-5], lines[-4], flush=True)  # noqa: T201 - progress
    with open(args.out, "w") as out:
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
