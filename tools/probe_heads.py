"""Which head, on frozen features? The measurements behind the analytic head (docs/benchmarks.md); a probe, not a test.

Embeds a stream's images once with the served backbone at its served input size (no experts), then fits every
candidate head on all training classes at once and scores the test images:

* class means (SimpleCIL), RanPAC (random ReLU projection + ridge, its own per-task ridge choice), a ridge
  regression on random ReLU features with fixed ridges;
* LDA with one pooled scatter on phi alone and on the served head's inputs (power-normalised phi + every site's
  pooled input), for a grid of ridge ratios, with the ratio the exact leave-one-out likelihood picks.

    PYTHONPATH=. .venv/bin/python tools/probe_heads.py --stream fmnist5 --train-per-class 100 --test-per-class 100
    PYTHONPATH=. .venv/bin/python tools/probe_heads.py --stream glyphs100 --num-tasks 30 --train-per-class 20 \\
        --test-per-class 10
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from model.backbone import WEIGHTS_BUNDLED, build_backbone, make_transform
from model.head import RIDGE_GRID, TEMPERATURE_GRID, HeadStatistics, block_scales, head_inputs
from model.network import run_sites
from model.trainer import embed_images, head_block_dims
from service.bench.accuracy import served_model_config
from service.bench.baselines import RanPAC, SimpleCIL
from service.bench.datasets import make_stream


def encode(args: argparse.Namespace) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    config = served_model_config()
    backbone = build_backbone(config, WEIGHTS_BUNDLED)
    transform = make_transform(backbone, config.image_size)
    options = {"num_tasks": args.num_tasks} if args.num_tasks else {}
    stream = make_stream(
        args.stream, seed=0, train_per_class=args.train_per_class, test_per_class=args.test_per_class, **options
    )
    out = {}
    for split in ("train", "test"):
        features, inputs, labels, offset = [], [], [], 0
        for task in stream.tasks:
            part = task.split(split)
            index = {label: offset + i for i, label in enumerate(task.classes)}
            for start in range(0, len(part.images), 64):
                batch = torch.stack([transform(image) for image in part.images[start : start + 64]])
                vectors: list[Tensor] = []
                with torch.no_grad():
                    phi = run_sites(
                        backbone, embed_images(backbone, batch), lambda _s: lambda t, _r: torch.zeros_like(t), vectors
                    )
                features.append(phi)
                inputs.append(head_inputs(phi, vectors))
            labels += [index[label] for label in part.labels]
            offset += len(task.classes)
            task.release(split)
        out[split] = (torch.cat(features), torch.cat(inputs), torch.tensor(labels))
    out["blocks"] = (torch.tensor(head_block_dims(backbone)),) * 3
    return out


def accuracy(predicted: Tensor, truth: Tensor) -> float:
    return round(float((predicted == truth).float().mean()) * 100, 2)


def lda(train: Tensor, labels: Tensor, test: Tensor, truth: Tensor) -> dict[str, Any]:
    classes = int(labels.max()) + 1
    statistics = HeadStatistics.empty(train.shape[1]).add(train, labels, classes)
    by_ratio, loo = {}, {}
    for ratio in RIDGE_GRID:
        weight, bias = statistics.solve(ratio)
        by_ratio[ratio] = accuracy((test.double() @ weight + bias).argmax(1), truth)
        scores, kept = statistics.leave_one_out_scores(ratio, train, labels)
        loo[ratio] = min(float(F.cross_entropy(scores / t, kept)) for t in TEMPERATURE_GRID)
    chosen = min(loo, key=lambda r: loo[r])
    return {"test_accuracy_by_ratio": by_ratio, "chosen_by_leave_one_out": chosen, "accuracy": by_ratio[chosen]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="fmnist5")
    parser.add_argument("--num-tasks", type=int)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = encode(args)
    (phi, z, y), (phi_t, z_t, y_t) = data["train"], data["test"]
    blocks = [int(b) for b in data["blocks"][0]]
    results: dict[str, Any] = {"images": [len(y), len(y_t)], "classes": int(y.max()) + 1}
    prototypes = SimpleCIL()
    prototypes.learn(phi, y)
    results["simplecil"] = accuracy(prototypes.predict(phi_t), y_t)
    ranpac = RanPAC(2048, seed=0)
    ranpac.learn(phi, y)
    results["ranpac"] = accuracy(ranpac.predict(phi_t), y_t)
    scale_phi = block_scales(phi, [phi.shape[1]])
    results["lda_phi"] = lda(phi * scale_phi, y, phi_t * scale_phi, y_t)
    scale = block_scales(z, blocks)
    results["lda_head_inputs"] = lda(z * scale, y, z_t * scale, y_t)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({"args": vars(args), **results}, indent=1))  # noqa: T201 - the probe's output


if __name__ == "__main__":
    main()
