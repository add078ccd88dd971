"""Registries of random-weight tasks, for benchmarks and tests that need hundreds of tasks without training them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.alignment import ClassStatistics
from model.synthetic import random_shared, random_task
from model.trainer import LearnedTask
from registry import Manifest
from service.modelstore import ModelStore, NewTask


def random_learned_task(
    store: ModelStore, index: int, classes: int, classifier: torch.Tensor, generator: torch.Generator
) -> LearnedTask:
    """A task with random weights, shaped like one the trainer produced (classifier grown by `classes` rows)."""
    config, backbone = store.config, store.backbone
    task = random_task(config, backbone.site_dims, index, classes, generator)
    shared = random_shared(config, backbone.site_dims, generator) if index == 0 else None
    block = torch.randn(classes, backbone.feature_dim, generator=generator)
    grown = torch.cat([classifier, block])
    dim = backbone.feature_dim
    statistics = ClassStatistics(grown.clone(), torch.ones(len(grown), dim), torch.full((len(grown),), 10))
    return LearnedTask(index, task, shared, grown, statistics)


def populate(
    store: ModelStore,
    num_tasks: int,
    classes_per_task: int = 3,
    *,
    tasks_per_version: int | None = None,
    seed: int = 0,
    parent: Manifest | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Publish `num_tasks` random tasks after `parent`, `tasks_per_version` per version (default: all in one).

    Labels are "c{task}-{k}" and task ids "t-syn{task:06d}", so they stay unique across calls.
    """
    generator = torch.Generator().manual_seed(seed)
    start = 0 if parent is None else len(parent.tasks)
    dim = store.backbone.feature_dim
    classifier = torch.randn(start * classes_per_task, dim, generator=generator)
    if parent is not None:
        classifier = store.load_tasks(parent).classifier.cpu()
    chunk = tasks_per_version or num_tasks
    manifest = parent
    pending: list[NewTask] = []
    for index in range(start, start + num_tasks):
        learned = random_learned_task(store, index, classes_per_task, classifier, generator)
        classifier = learned.classifier
        classes = [f"c{index}-{k}" for k in range(classes_per_task)]
        pending.append(NewTask(learned, f"t-syn{index:06d}", classes, name=f"synthetic {index}"))
        if len(pending) == chunk or index == start + num_tasks - 1:
            manifest = store.publish(manifest, pending)
            pending = []
        if progress is not None:
            progress(index + 1 - start)
    assert manifest is not None
    return manifest
