"""What MoRAM's atoms cost at one site, faithful and bounded, beside one ViT block (issue 15, item 3).

`python -m bench.moram_cost [--tasks 10 100 300] [--dim 768] [--tokens 197] [--batch 8]` times, per batch, the
delta of one site at a width-`dim` ViT site (random atoms, r = 16 a task, k = 16, tau = 0.01, delta = 0.2), in
the published form (every token scores every atom) and the bounded one (each image preselects `--candidates`
atoms on its CLS token), next to one timm ViT block of the same width (what a site costs the backbone). Medians of
interleaved repeats; CPU threads as torch has them.

`python -m bench.moram_cost --model vit_base_patch16_224 --batch 2` times the whole forward pass instead (random
weights): the backbone alone, CaRE's fast path (random tasks, routers resident) and MoRAM faithful and bounded.

`python -m bench.moram_cost --accuracy` instead trains five 2-class tasks of scikit-learn's digits (all ten digits)
with MoRAM on the bundled EfficientNet-Lite0 and reports the accuracy over every class, without a task id, of the
faithful form and of bounded forms of the same lineage (the head solved from faithful features, so the bounded rows
are what switching the bound on at serving time would cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from timm.models.vision_transformer import Block

from model.config import ModelConfig, TrainConfig
from model.moram import AtomStack, MoramOptions, SiteAtoms, moram_bounded, moram_faithful


def _median_ms(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in functions}
    with torch.inference_mode():
        for function in functions.values():
            function()  # warm-up
        for _ in range(repeats):
            for name, function in functions.items():
                started = time.perf_counter()
                function()
                times[name].append(1000 * (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in times.items()}


def _emit(row: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(row) + "\n")
    sys.stdout.flush()


def site_cost(
    tasks: list[int], dim: int, tokens: int, batch: int, candidates: int, repeats: int
) -> list[dict[str, float]]:
    """Milliseconds per batch of one site's delta, faithful and bounded, and of one ViT block, per task count."""
    generator = torch.Generator().manual_seed(0)
    block = Block(dim, num_heads=max(1, dim // 64)).eval()
    hidden = torch.randn(batch, tokens, dim, generator=generator)
    routing = hidden[:, 0]
    faithful = MoramOptions(top_k=16, temperature=0.01, threshold=0.2)
    bounded = dataclasses.replace(faithful, candidates=candidates)
    rows: list[dict[str, float]] = []
    for count in tasks:
        atoms_n = 16 * count
        atoms = AtomStack(torch.randn(atoms_n, dim, generator=generator) / dim**0.5, torch.randn(atoms_n, dim) * 0.01)
        gram = SiteAtoms(atoms).gram()
        ms = _median_ms(
            {
                "block_ms": functools.partial(block, hidden),
                "faithful_ms": functools.partial(moram_faithful, hidden, atoms, faithful),
                "bounded_ms": functools.partial(moram_bounded, hidden, routing, atoms, bounded, gram),
            },
            repeats,
        )
        rows.append({"tasks": count, "atoms": atoms_n, "candidates": candidates, **ms})
        _emit(rows[-1])
    return rows


def bound_accuracy(candidates: list[int], rank: int = 8) -> list[dict[str, float]]:
    """Accuracy over all ten digits after five 2-class MoRAM tasks, faithful and with each bound."""

    from bench.datasets import digits_split
    from model.backbone import build_backbone, make_transform
    from model.moram import MoramLineage, MoramModel, advance_moram, learn_moram_task

    config = ModelConfig(image_size=64, method="moram", moram_rank=rank, moram_top_k=rank)
    backbone = build_backbone(config, "bundled")
    transform = make_transform(backbone, 64)
    images, targets, train_rows, test_rows = digits_split(transform)
    lineage = MoramLineage.empty(backbone.feature_dim)
    train = TrainConfig(epochs=4, batch_size=16, min_steps=0)
    tasks = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for classes in tasks:
        rows = torch.cat([train_rows[targets[train_rows] == c][:40] for c in classes])
        labels = torch.tensor([classes.index(int(t)) for t in targets[rows]])
        learned = learn_moram_task(backbone, config, train, lineage, images[rows], labels, len(classes))
        _emit({"task": list(classes), **learned.metrics})
        lineage = advance_moram(lineage, learned, rank)
    assert lineage.bank is not None
    model = MoramModel(config, backbone, lineage.bank, lineage.classifier, lineage.head)
    seen = [c for classes in tasks for c in classes]
    truth = torch.tensor([seen.index(int(t)) for t in targets[test_rows]])
    results = []
    for bound in [0, *candidates]:
        started = time.perf_counter()
        predicted = torch.cat(
            [
                model.logits(images[test_rows[i : i + 64]], candidates=bound).argmax(1)
                for i in range(0, len(test_rows), 64)
            ]
        )
        accuracy = float((predicted == truth).float().mean())
        row = {"atoms": lineage.bank.num_atoms, "candidates": bound, "accuracy": accuracy}
        row["seconds"] = time.perf_counter() - started
        results.append(row)
        _emit(row)
    return results


def model_cost(
    backbone_name: str, tasks: list[int], batch: int, image_size: int, candidates: int, repeats: int
) -> list[dict[str, float]]:
    """Milliseconds per batch of the whole forward pass: backbone alone, CaRE's fast path, MoRAM faithful and
    bounded (random weights, r = k = 16, every block a site on a ViT), medians of interleaved repeats."""
    from bench.model_bench import random_model
    from model.backbone import build_backbone
    from model.moram import AtomBank, MoramModel

    care_config = ModelConfig(backbone=backbone_name, image_size=image_size)
    backbone = build_backbone(care_config, "random")
    moram_config = dataclasses.replace(care_config, method="moram")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    rows: list[dict[str, float]] = []
    for count in tasks:
        care, routers = random_model(care_config, backbone, count)
        sites = [
            AtomStack(torch.randn(16 * count, d, generator=generator) / d**0.5, torch.randn(16 * count, d) * 0.01)
            for d in backbone.site_dims
        ]
        bank = AtomBank(sites, 16)
        bank.prepare_fast_path()
        classifier = torch.randn(3 * count, backbone.feature_dim, generator=generator)
        moram = MoramModel(moram_config, backbone, bank, classifier)
        bounded = MoramModel(dataclasses.replace(moram_config, moram_candidates=candidates), backbone, bank, classifier)
        ms = _median_ms(
            {
                "backbone_ms": functools.partial(backbone.forward_plain, images),
                "care_fast_ms": functools.partial(care.forward_features, images, routers, "fast"),
                "moram_faithful_ms": functools.partial(moram.logits, images),
                "moram_bounded_ms": functools.partial(bounded.logits, images),
            },
            repeats,
        )
        rows.append({"tasks": count, "batch": batch, "candidates": candidates, **ms})
        _emit({"backbone": backbone_name, **rows[-1]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[10, 100, 300])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accuracy", action="store_true", help="measure what the bound costs in accuracy instead")
    parser.add_argument("--model", default="", help="time the whole forward pass of this timm backbone instead")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    if args.model:
        model_cost(args.model, args.tasks, args.batch, args.image_size, args.candidates, args.repeats)
    elif args.accuracy:
        bound_accuracy([4, 8, 16, 24])
    else:
        site_cost(args.tasks, args.dim, args.tokens, args.batch, args.candidates, args.repeats)


if __name__ == "__main__":
    main()
