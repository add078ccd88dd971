"""Routers from the registry, through the cache: the `RouterSource` a served or training model reads.

A task's routers file (role `routers` in its manifest record) is read on demand, keyed by its sha256 so a task's
routers stay cached across versions, and kept in a `TieredLRUCache` whose device tier lives on the model's device
and whose host tier is in (pinned, on CUDA) host memory.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, cast

import torch

from model import artifacts
from model.routers import TaskRouters
from registry import Manifest, Registry
from service.routers.cache import TieredLRUCache

__all__ = ["ROLE_ROUTERS", "CachedRouters", "RouterCache", "new_router_cache", "normal_tensors", "router_bytes"]

ROLE_ROUTERS = "routers"  # the role of a task's routers file in its manifest record

RouterCache = TieredLRUCache[str, TaskRouters]


def normal_tensors() -> AbstractContextManager[None]:
    """Create tensors that autograd accepts, even when the caller runs under `torch.inference_mode`.

    The router cache is shared by every pass of a process: in the worker, the train-accuracy and serving passes
    (inference mode) and the next task's training steps (autograd) read the same cached routers. A tensor created
    under inference mode is an "inference tensor" that autograd refuses to save for backward, so whatever enters
    the cache is created outside it (no_grad still applies: nothing here records a graph).
    """
    return cast(AbstractContextManager[None], torch.inference_mode(False))


def router_bytes(routers: TaskRouters) -> int:
    """Bytes a task's routers occupy (every site)."""
    return sum(w.numel() * w.element_size() + b.numel() * b.element_size() for w, b in routers)


def new_router_cache(
    device: torch.device,
    device_capacity_bytes: int | None,
    host_capacity_bytes: int = 0,
    **hooks: Any,
) -> RouterCache:
    """A router cache that keeps its device tier on `device` and its host tier in (pinned, on CUDA) host memory."""

    def to_device(routers: TaskRouters) -> TaskRouters:
        # The loader reads files into memory of our own (Registry.load_tensors), so on a CPU this moves nothing.
        with normal_tensors():
            return [(w.to(device), b.to(device)) for w, b in routers]

    def to_host(routers: TaskRouters) -> TaskRouters:
        if device.type == "cuda":
            with normal_tensors():
                return [(w.cpu().pin_memory(), b.cpu().pin_memory()) for w, b in routers]
        return routers

    return TieredLRUCache(
        size_of=router_bytes,
        device_capacity_bytes=device_capacity_bytes,
        host_capacity_bytes=host_capacity_bytes,
        to_device=to_device,
        to_host=to_host,
        **hooks,
    )


class CachedRouters:
    """A `RouterSource` over one version's tasks, reading routers through the shared cache.

    The cache key is the routers file's sha256, so a task's routers stay cached across versions (files are
    immutable and reused by every later version).
    """

    def __init__(self, registry: Registry, manifest: Manifest, site_dims: list[int], cache: RouterCache) -> None:
        self._registry = registry
        self._site_dims = site_dims
        self._cache = cache
        self._entries = [
            (manifest.files[task.files[ROLE_ROUTERS]].sha256, task.files[ROLE_ROUTERS]) for task in manifest.tasks
        ]

    def hold(self, task: int) -> AbstractContextManager[TaskRouters]:
        key, path = self._entries[task]
        return self._cache.hold(key, lambda: self._load(task, path))

    def _load(self, task: int, path: str) -> TaskRouters:
        with normal_tensors(), torch.no_grad():
            tensors = self._registry.load_tensors(path)
            return artifacts.routers_from_tensors(tensors, task, self._site_dims, path)

    def total_bytes(self) -> int:
        """Bytes of every task's routers in float32: what an uncapped cache would hold (task t: t x (d + 1) a site)."""
        return sum((task + 1) * (dim + 1) * 4 for task in range(len(self._entries)) for dim in self._site_dims)
