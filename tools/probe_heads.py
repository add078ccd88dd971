"""Which head, on frozen features? The measurements behind the analytic head (docs/benchmarks.md); a probe, not a test.

Embeds a stream's images once with the served backbone at its served input size (no experts), then fits every
candidate head on all training classes at once and scores the test images:

* class means (SimpleCIL), RanPAC (random ReLU projection + ridge, its own per-task ridge choice), a ridge
  regression on random ReLU features with fixed ridges;
* LDA with one pooled scatter on phi alone and on the served head's inputs (power-normalised phi + every site's
  pooled input), for a grid of ridge ratios, with the ratio the exact leave-one-out likelihood picks;
* variants of that LDA (issue 11's later attempts): transformed copies of the training images added to the
  statistics (`--augment flip,crop`: mirrored; a random crop of 90-100 % of the side, resized back), and random ReLU
  features of phi appended to the head's inputs (`--random-features M`). `--ridges` widens the grid.

    PYTHONPATH=. .venv/bin/python tools/probe_heads.py --stream fmnist5 --train-per-class 100 --test-per-class 100
    PYTHONPATH=. .venv/bin/python tools/probe_heads.py --stream glyphs100 --num-tasks 30 --train-per-class 20 \\
        --test-per-class 10
    PYTHONPATH=. .venv/bin/python tools/probe_heads.py --stream fmnist5 --train-per-class 60 --test-per-class 60 \\
        --augment flip,crop --random-features 1024 --ridges 0.01,0.03,0.1,0.3,1,3,10,30,100
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.nn import functional as F

from bench.accuracy import served_model_config
from bench.baselines import RanPAC, SimpleCIL
from bench.datasets import make_stream
from model.backbone import WEIGHTS_BUNDLED, build_backbone, make_transform
from model.head import RIDGE_GRID, TEMPERATURE_GRID, HeadStatistics, block_scales, head_inputs
from model.network import run_sites
from model.trainer import embed_images, head_block_dims


def random_crop(image: Image.Image, rng: random.Random, smallest: float = 0.9) -> Image.Image:
    """A random square-ish crop of `smallest`..100 % of each side, resized back to the image's size."""
    width, height = image.size
    side = rng.uniform(smallest, 1.0)
    crop_w, crop_h = int(width * side), int(height * side)
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    return image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BILINEAR)


AUGMENTATIONS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "flip": lambda image, _rng: ImageOps.mirror(image),
    "crop": random_crop,
}


def encode(args: argparse.Namespace) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    config = served_model_config()
    backbone = build_backbone(config, WEIGHTS_BUNDLED)
    transform = make_transform(backbone, config.image_size)
    options = {"num_tasks": args.num_tasks} if args.num_tasks else {}
    stream = make_stream(
        args.stream, seed=0, train_per_class=args.train_per_class, test_per_class=args.test_per_class, **options
    )
    rng = random.Random(0)
    augmentations = [name for name in (args.augment or "").split(",") if name]
    out = {}
    for split in ("train", "test", *(f"train_{name}" for name in augmentations)):
        features, inputs, labels, offset = [], [], [], 0
        for task in stream.tasks:
            part = task.split(split.split("_")[0])
            images = part.images
            if "_" in split:
                augment = AUGMENTATIONS[split.split("_")[1]]
                images = [augment(image.convert("RGB"), rng) for image in images]
            index = {label: offset + i for i, label in enumerate(task.classes)}
            for start in range(0, len(images), 64):
                batch = torch.stack([transform(image) for image in images[start : start + 64]])
                vectors: list[Tensor] = []
                with torch.no_grad():
                    phi = run_sites(
                        backbone, embed_images(backbone, batch), lambda _s: lambda t, _r: torch.zeros_like(t), vectors
                    )
                features.append(phi)
                inputs.append(head_inputs(phi, vectors))
            labels += [index[label] for label in part.labels]
            offset += len(task.classes)
            task.release(split.split("_")[0])
        out[split] = (torch.cat(features), torch.cat(inputs), torch.tensor(labels))
    out["blocks"] = (torch.tensor(head_block_dims(backbone)),) * 3
    return out


def accuracy(predicted: Tensor, truth: Tensor) -> float:
    return round(float((predicted == truth).float().mean()) * 100, 2)


def lda(
    train: Tensor,
    labels: Tensor,
    test: Tensor,
    truth: Tensor,
    ridges: tuple[float, ...] = RIDGE_GRID,
    extra: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """LDA over `train` (plus `extra` rows in the statistics: augmented copies), scored on `test` for every ridge.

    The leave-one-out choice leaves out an original row only (its augmented copies stay in): with `extra` it is
    optimistic, so read the accuracy by ratio as well.
    """
    classes = int(labels.max()) + 1
    rows, row_labels = (train, labels)
    if extra is not None:
        rows, row_labels = torch.cat([train, extra[0]]), torch.cat([labels, extra[1]])
    statistics = HeadStatistics.empty(train.shape[1]).add(rows, row_labels, classes)
    by_ratio, loo = {}, {}
    for ratio in ridges:
        weight, bias = statistics.solve(ratio)
        by_ratio[ratio] = accuracy((test.double() @ weight + bias).argmax(1), truth)
        scores, kept = statistics.leave_one_out_scores(ratio, train, labels)
        loo[ratio] = min(float(F.cross_entropy(scores / t, kept)) for t in TEMPERATURE_GRID)
    chosen = min(loo, key=lambda r: loo[r])
    return {
        "test_accuracy_by_ratio": by_ratio,
        "best": max(by_ratio.values()),
        "chosen_by_leave_one_out": chosen,
        "accuracy": by_ratio[chosen],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="fmnist5")
    parser.add_argument("--num-tasks", type=int)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--augment", help="comma-separated: " + ", ".join(AUGMENTATIONS))
    parser.add_argument("--random-features", type=int, default=0, help="random ReLU features of phi appended")
    parser.add_argument("--ridges", help="comma-separated ridge ratios (default: the served grid)")
    args = parser.parse_args()
    ridges = tuple(float(r) for r in args.ridges.split(",")) if args.ridges else RIDGE_GRID
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
    results["lda_head_inputs"] = lda(z * scale, y, z_t * scale, y_t, ridges)
    augmented = [key for key in data if key.startswith("train_")]
    for key in augmented:
        copies = data[key]
        results[f"lda_head_inputs+{key[6:]}"] = lda(z * scale, y, z_t * scale, y_t, ridges, (copies[1] * scale, y))
    if len(augmented) > 1:
        every = (torch.cat([data[k][1] for k in augmented]) * scale, torch.cat([y] * len(augmented)))
        results["lda_head_inputs+" + "+".join(k[6:] for k in augmented)] = lda(
            z * scale, y, z_t * scale, y_t, ridges, every
        )
    if args.random_features:
        projection = torch.randn(phi.shape[1], args.random_features, generator=torch.Generator().manual_seed(0))
        wide, wide_t = (torch.cat([v, torch.relu(p @ projection)], 1) for v, p in ((z, phi), (z_t, phi_t)))
        wide_scale = block_scales(wide, [*blocks, args.random_features])
        results[f"lda_head_inputs+random{args.random_features}"] = lda(
            wide * wide_scale, y, wide_t * wide_scale, y_t, ridges
        )
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({"args": vars(args), **results}, indent=1))  # noqa: T201 - the probe's output


if __name__ == "__main__":
    main()
