"""Registries of random-weight tasks, for benchmarks and tests that need hundreds of tasks without training them."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model import artifacts
from model.adapter import TaskModules
from model.alignment import ClassStatistics
from model.backbone import SiteBackbone, SiteFn
from model.bank import ExpertBank
from model.config import ModelConfig
from model.moe import RoutingOptions, fast_moe
from model.routers import ResidentRouters
from model.synthetic import random_shared, random_task, synthetic_head
from model.trainer import LearnedTask
from registry import Manifest
from service.modelstore import ModelStore, NewTask


def _learned(
    index: int, task: TaskModules, shared: nn.ModuleList | None, classifier: Tensor | None, store: ModelStore
) -> LearnedTask:
    """A LearnedTask carrying what `ModelStore.publish` reads: the classifier and statistics only where given.

    Publishing reads the classifier and trainer state of the last task of a version only, so the others carry
    empty ones: keeping a grown classifier per task would take memory quadratic in the number of tasks.
    """
    dim = store.backbone.feature_dim
    weight = torch.empty(0, dim) if classifier is None else classifier
    statistics = ClassStatistics(
        weight, torch.ones(1, dim).expand(len(weight), dim), torch.ones(len(weight), dtype=torch.long)
    )
    head = synthetic_head(store.config, weight, store.backbone.site_dims) if classifier is not None else None
    return LearnedTask(index, task, shared, weight, statistics, head=head)


def key_images(count: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images (an 8x8 grid upsampled), normalised like the backbone's inputs: one per task."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.rand(count, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(grid, size=(image_size, image_size), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    return (images.clamp(0, 1) - mean) / std


def _routing_vectors(
    backbone: SiteBackbone, bank: ExpertBank, routers: ResidentRouters, config: ModelConfig, images: Tensor, site: int
) -> Tensor:
    """The routing vector each image presents at `site`, routed by the current bank (B, d)."""
    captured: list[Tensor] = []
    options = RoutingOptions(config.top_routers, config.top_experts)

    def site_fn(index: int) -> SiteFn:
        experts, perceptrons, shared = bank.sites[index].folded()
        table = bank.sites[index].perceptron_table()

        def moe(tokens: Tensor, routing: Tensor) -> Tensor:
            if index == site:
                captured.append(routing)
            return fast_moe(tokens, routing, experts, perceptrons, shared, index, routers, options, table=table)

        return moe

    with torch.inference_mode():
        for start in range(0, len(images), 64):
            hidden = backbone.embed(images[start : start + 64])
            for index in range(site + 1):
                hidden = backbone.forward_site(hidden, index, site_fn(index))
    return torch.cat(captured)


def keyed_learned_tasks(
    store: ModelStore,
    keys: Tensor,
    classes: int,
    generator: torch.Generator,
    sharpness: float = 8.0,
    device: torch.device | None = None,
) -> list[LearnedTask]:
    """Random tasks whose perceptrons are keyed to one image each, so that image t is routed to task t's router.

    Random perceptrons are confident or not regardless of the input, so a few tasks win every routing decision;
    trained ones are confident on their own classes. To benchmark caches under realistic task mixes, task t's
    perceptron at every site is set to give its first class a logit of `sharpness` on key image t (and less on
    images whose routing vectors differ), site by site so that each site sees the routing the earlier ones chose.
    The routing vectors are computed on `device` when given (a copy of the backbone there: minutes of CPU at
    hundreds of tasks), the tasks are made and returned on the CPU.
    """
    config, backbone = store.config, store.backbone
    routing_backbone = backbone if device is None else copy.deepcopy(backbone).to(device)
    routing_keys = keys if device is None else keys.to(device)
    dims = backbone.site_dims
    tasks = [random_task(config, dims, index, classes, generator) for index in range(len(keys))]
    shared = random_shared(config, dims, generator)
    routers = ResidentRouters(
        [[(t.router(s).weight.detach(), t.router(s).bias.detach()) for s in range(t.num_sites)] for t in tasks]
    )
    routing_routers = routers if device is None else routers.to(device)  # the routers stay as drawn

    def bank() -> ExpertBank:
        stacked = [(artifacts.task_expert_tensors(t), classes) for t in tasks]
        return artifacts.stack_tasks(artifacts.shared_tensors(shared), stacked, config, dims)

    for site in range(backbone.num_sites):
        site_bank = bank() if device is None else bank().to(device)  # the perceptrons change site by site
        vectors = _routing_vectors(routing_backbone, site_bank, routing_routers, config, routing_keys, site).cpu()
        with torch.no_grad():
            for index, task in enumerate(tasks):
                own = F.layer_norm(task.expert(site)(vectors[index]), (dims[site],))  # LN(c_t) of its key image
                perceptron = task.perceptron(site)
                perceptron.norm.weight.fill_(1.0)
                perceptron.norm.bias.zero_()
                perceptron.linear.weight.zero_()
                perceptron.linear.weight[0] = own * (sharpness / own.norm() ** 2)
                perceptron.linear.bias.zero_()
    dim = backbone.feature_dim
    classifier = torch.randn(len(tasks) * classes, dim, generator=generator)
    last = len(tasks) - 1
    return [
        _learned(i, task, shared if i == 0 else None, classifier if i == last else None, store)
        for i, task in enumerate(tasks)
    ]


def populate(
    store: ModelStore,
    num_tasks: int,
    classes_per_task: int = 3,
    *,
    tasks_per_version: int | None = None,
    seed: int = 0,
    parent: Manifest | None = None,
    progress: Callable[[int], None] | None = None,
    keys: Tensor | None = None,
) -> Manifest:
    """Publish `num_tasks` random tasks after `parent`, `tasks_per_version` per version (default: all in one).

    Labels are "c{task}-{k}" and task ids "t-syn{task:06d}", so they stay unique across calls. With `keys` (one
    preprocessed image per task, first version only) the tasks are keyed: image t is routed to task t.
    """
    if keys is not None:
        if parent is not None or len(keys) != num_tasks:
            raise ValueError("keyed tasks need one key image per task and an empty registry")
        keyed = keyed_learned_tasks(store, keys, classes_per_task, torch.Generator().manual_seed(seed))
        new = [
            NewTask(task, f"t-syn{i:06d}", [f"c{i}-{k}" for k in range(classes_per_task)])
            for i, task in enumerate(keyed)
        ]
        return store.publish(None, new)
    generator = torch.Generator().manual_seed(seed)
    start = 0 if parent is None else len(parent.tasks)
    config, backbone = store.config, store.backbone
    dim = backbone.feature_dim
    blocks = [store.load_tasks(parent).classifier.cpu()] if parent is not None else []
    chunk = tasks_per_version or num_tasks
    manifest = parent
    pending: list[NewTask] = []
    for index in range(start, start + num_tasks):
        task = random_task(config, backbone.site_dims, index, classes_per_task, generator)
        shared = random_shared(config, backbone.site_dims, generator) if index == 0 else None
        blocks.append(torch.randn(classes_per_task, dim, generator=generator))
        closing = len(pending) + 1 == chunk or index == start + num_tasks - 1
        learned = _learned(index, task, shared, torch.cat(blocks) if closing else None, store)
        classes = [f"c{index}-{k}" for k in range(classes_per_task)]
        pending.append(NewTask(learned, f"t-syn{index:06d}", classes, name=f"synthetic {index}"))
        if closing:
            manifest = store.publish(manifest, pending)
            pending = []
        if progress is not None:
            progress(index + 1 - start)
    assert manifest is not None
    return manifest
