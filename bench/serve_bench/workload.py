"""What the servers serve and what they are compared with: keyed synthetic tasks published as versions of growing
size (`TaskSource`), and the backbone alone, the fast and the reference path timed in this process (`Offline`)."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bench.model_bench import time_call
from bench.serve_bench.config import CPU
from bench.synthetic import keyed_learned_tasks
from model.adapter import TaskModules
from model.alignment import ClassStatistics
from model.backbone import SiteBackbone
from model.network import CareModel
from model.synthetic import random_task, synthetic_head
from model.trainer import LearnedTask
from registry import Manifest
from service.inference.snapshot import ServedVersion, SnapshotLoader
from service.modelstore import ModelStore, NewTask
from service.routers.source import new_router_cache

# --------------------------------------------------------------------------------------------------------------------
# Synthetic tasks


def _learned(index: int, task: TaskModules, shared: Any, classifier: Tensor, store: ModelStore) -> LearnedTask:
    """A LearnedTask with `classifier` (every class so far) and statistics of the right shape (never read)."""
    rows, dim = classifier.shape
    statistics_ = ClassStatistics(classifier, torch.ones(1, dim).expand(rows, dim), torch.ones(rows, dtype=torch.long))
    head = synthetic_head(store.config, classifier, store.backbone.site_dims)
    return LearnedTask(index, task, shared, classifier, statistics_, head=head)


class TaskSource:
    """Keyed tasks built once, published as versions of growing size; then uninformative tasks one at a time.

    Args:
        store: Where to publish.
        keys: One preprocessed image per keyed task (exactly what the server computes from the client's images).
        classes: Classes per task.
        seed: Seeds the task weights.
        device: Where the keyed routing is computed (the servers' device; the tasks are the same on any).
    """

    def __init__(self, store: ModelStore, keys: Tensor, classes: int, seed: int, device: torch.device = CPU) -> None:
        self.store = store
        self.classes = classes
        self.generator = torch.Generator().manual_seed(seed + 1)
        generator = torch.Generator().manual_seed(seed)
        self.keyed = keyed_learned_tasks(store, keys, classes, generator, device=None if device == CPU else device)
        self.full_classifier = self.keyed[-1].classifier
        self.manifest: Manifest | None = None
        self.classifier = torch.empty(0, store.backbone.feature_dim)

    @property
    def num_tasks(self) -> int:
        return 0 if self.manifest is None else len(self.manifest.tasks)

    def publish_keyed(self, upto: int) -> Manifest:
        """Publish keyed tasks num_tasks..upto-1 as one version."""
        start = self.num_tasks
        self.classifier = self.full_classifier[: upto * self.classes]
        new = []
        for index in range(start, upto):
            learned = self.keyed[index]
            if index == upto - 1:
                learned = _learned(index, learned.task, learned.shared, self.classifier, self.store)
            new.append(NewTask(learned, f"t-syn{index:06d}", [f"c{index}-{k}" for k in range(self.classes)]))
        self.manifest = self.store.publish(self.manifest, new)
        return self.manifest

    def publish_uninformative(self) -> Manifest:
        """Publish one random task whose perceptrons are uniform: it never wins a routing decision, so the traffic
        keeps its routing and the hot-load time is not mixed up with a change of cache behaviour."""
        index = self.num_tasks
        task = random_task(self.store.config, self.store.backbone.site_dims, index, self.classes, self.generator)
        with torch.no_grad():
            for site in range(task.num_sites):
                task.perceptron(site).linear.weight.zero_()
                task.perceptron(site).linear.bias.zero_()
        rows = torch.randn(self.classes, self.store.backbone.feature_dim, generator=self.generator)
        self.classifier = torch.cat([self.classifier, rows])
        learned = _learned(index, task, None, self.classifier, self.store)
        new = NewTask(learned, f"t-hot{index:06d}", [f"h{index}-{k}" for k in range(self.classes)])
        self.manifest = self.store.publish(self.manifest, [new])
        return self.manifest


# --------------------------------------------------------------------------------------------------------------------
# Offline timings in this process (the server idle meanwhile)


class Offline:
    """The backbone alone, and the fast and reference paths of a version, in this process, on the servers' device.

    Images are moved to the device before the clock starts; the times include waiting for the device's kernels.
    `unfolded`: timm's backbone as built, batch norms not folded (what a user running timm gets), timed beside the
    served one.
    """

    def __init__(self, store: ModelStore, device: torch.device = CPU, unfolded: SiteBackbone | None = None) -> None:
        if device != CPU:  # a store of its own reading the same registry, its backbone a copy on the device
            backbone = copy.deepcopy(store.backbone).to(device)
            store = ModelStore(store.registry, store.config, backbone, device)
        self.store = store
        self.device = device
        self.backbone: SiteBackbone = store.backbone
        self.unfolded = unfolded.to(device) if unfolded is not None else None
        self.loader = SnapshotLoader(store, new_router_cache(device, None))
        self.served: ServedVersion | None = None

    def load(self, manifest: Manifest) -> ServedVersion:
        self.served = self.loader.load(manifest, self.served)
        return self.served

    def backbone_s(self, images: Tensor) -> float:
        images = images.to(self.device)
        with torch.inference_mode():
            return time_call(lambda: self.backbone.forward_plain(images))

    def unfolded_backbone_s(self, images: Tensor) -> float:
        assert self.unfolded is not None, "no unfolded backbone given"
        unfolded, images = self.unfolded, images.to(self.device)
        with torch.inference_mode():
            return time_call(lambda: unfolded.forward_plain(images))

    def path_s(self, images: Tensor, path: str) -> float:
        served = self.served
        assert served is not None and isinstance(served.network, CareModel) and served.routers is not None
        network, routers = served.network, served.routers
        images = images.to(self.device)
        with torch.inference_mode():
            return time_call(lambda: network.logits(images, routers, "fast" if path == "fast" else "reference"))

    def own_task_fraction(self, images: Tensor, tasks: Sequence[int]) -> float:
        """Fraction of images whose most used router (over sites and the M picks) is their own task's."""
        served = self.served
        assert served is not None and isinstance(served.network, CareModel) and served.routers is not None
        selected: list[Tensor] = []
        served.network.forward_features(images.to(self.device), served.routers, "fast", selected)
        per_image = torch.cat(selected, dim=1)
        own = [int(torch.mode(row).values) == task for row, task in zip(per_image, tasks, strict=True)]
        return sum(own) / len(own)

    def backbone_throughput(self, batch_sizes: Sequence[int], pool: Tensor, repeats: int) -> dict[int, float]:
        """Images per second of the backbone alone at each batch size (median of `repeats` forward passes)."""
        result = {}
        for size in batch_sizes:
            images = pool[torch.arange(size) % len(pool)]
            self.backbone_s(images)
            times = [self.backbone_s(images) for _ in range(repeats)]
            result[size] = round(size / statistics.median(times), 2)
        return result
