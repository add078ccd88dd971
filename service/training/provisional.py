"""Provisional classes: a task's classes added to the served analytic head in closed form, before training.

The head is LDA on statistics that accumulate exactly (model/head.py), and a task's experts do not change how
earlier tasks' images are routed, so a queued task's classes can be served from one forward pass of its images
through the current version: their head inputs join the head statistics, the head is re-solved, and the worker
publishes a version with the same trained tasks and a new head (service/modelstore.py, `publish_provisional`).
When the task is trained, its trained version is published with the statistics of the trained features, and the
tasks still provisional are re-embedded through that version (every served class lives in one feature space).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from model.head import RIDGE_GRID, AnalyticHead, HeadStatistics
from model.routers import RouterSource
from service.modelstore import ServedNetwork

CHUNK = 32  # images per forward pass


def served_inputs(network: ServedNetwork, routers: RouterSource, images: Tensor) -> Tensor:
    """The served head's (unscaled) inputs of preprocessed images (N, 3, H, W) through `network` (CaRE's or MoRAM's,
    which ignores `routers`), a normal tensor."""
    if network.head is None:
        raise ValueError("provisional classes need the analytic head")
    rows = []
    with torch.inference_mode():
        for start in range(0, len(images), CHUNK):
            # channels_last halves the convolutions below the first site on a CPU (measured on EfficientNet-Lite0
            # at 224 px: 9.3 s -> 5.0 s for 200 images on one core; outputs within 5e-5 of the contiguous ones).
            batch = images[start : start + CHUNK].contiguous(memory_format=torch.channels_last)
            hidden = network.backbone.embed(batch)
            rows.append(network.head_inputs_from_embedding(hidden, routers))
    return torch.cat(rows).clone()


def add_classes(
    statistics: HeadStatistics,
    head: AnalyticHead,
    inputs: Tensor,
    labels: Tensor,
    num_new: int,
    ridge_ratio: float | None,
) -> tuple[HeadStatistics, AnalyticHead]:
    """`statistics` plus `num_new` classes (unscaled `inputs`, labels 0..num_new-1), and the head solved from them.

    The new classes come after every class of `statistics`; the scale is the lineage's (`head.scale`); ridge and
    temperature are the lineage's current choice (see `solve_factored`).
    """
    with torch.no_grad():
        offset = statistics.num_classes
        grown = statistics.add(inputs * head.scale.to(inputs.device), labels, num_new)
        solved = solve_factored(grown, head.scale, ridge_ratio, (inputs, labels + offset), head.temperature)
    return grown, solved


def rebuild(
    trained: HeadStatistics,
    scale: Tensor,
    temperature: float,
    tasks: Sequence[tuple[Tensor, Tensor, int]],
    ridge_ratio: float | None,
) -> tuple[HeadStatistics, AnalyticHead]:
    """The head over the trained classes of `trained` followed by `tasks` ((unscaled inputs, labels, classes) each).

    Ridge and temperature are the lineage's current choice (see `solve_factored`).
    """
    with torch.no_grad():
        statistics = trained
        calibration_inputs, calibration_labels = [], []
        for inputs, labels, num_new in tasks:
            offset = statistics.num_classes
            statistics = statistics.add(inputs * scale.to(inputs.device), labels, num_new)
            calibration_inputs.append(inputs)
            calibration_labels.append(labels + offset)
        if calibration_inputs:
            calibration = (torch.cat(calibration_inputs), torch.cat(calibration_labels))
        else:
            calibration = (torch.zeros(0, statistics.dim), torch.zeros(0, dtype=torch.long))
        head = solve_factored(statistics, scale, ridge_ratio, calibration, temperature)
    return statistics, head


def solve_factored(
    statistics: HeadStatistics,
    scale: Tensor,
    ridge_ratio: float | None,
    calibration: tuple[Tensor, Tensor],
    previous_temperature: float,
) -> AnalyticHead:
    """The head of `statistics` from one Cholesky factorisation, with the lineage's current choice of ridge and
    temperature (`HeadStatistics.choice`, from the leave-one-out evidence of every trained task).

    `model.head.solve_head` also adds the new images' leave-one-out evidence, which costs one factorisation per
    ridge on the grid (about 0.5 s each at 2704 inputs); a provisional head does without it, and the trained
    version adds the task's evidence. `calibration` is not used: it is kept for the signature of `solve_head`.
    """
    del calibration
    chosen = statistics.choice()
    ratio, temperature = chosen if chosen is not None else (RIDGE_GRID[2], previous_temperature)
    if ridge_ratio is not None:
        ratio = ridge_ratio
    weight, bias = statistics.solve(ratio)
    return AnalyticHead(scale, weight.float().to(scale.device), bias.float().to(scale.device), temperature, ratio)
