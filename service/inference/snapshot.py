"""The served version: one immutable, numbered registry version as served, and how the next one is built beside it.

Vocabulary: a `ServedVersion` is one registry version as served; its `network` is what computes its probabilities
(a `ServedNetwork`: CaRE's `CareModel`, model/network.py, with the version's routers, or MoRAM's `MoramModel`,
model/moram.py, or SETA's `SetaModel`, model/seta.py, which have none); the `ServingSlot` holds the
`ServedVersion` being `served` and swaps newer ones in.

Serving holds a reference to the current `ServedVersion`; a new version is loaded in the background (only its new
files are read: the resident tensors of earlier tasks are reused) and swapped in with one assignment, so a batch
runs entirely on one version and no request fails during the swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from model.routers import RouterSource
from registry import Manifest
from service.inference.acceleration import Acceleration
from service.modelstore import NO_ROUTERS, LoadedTasks, ModelStore, ServedNetwork, iter_labels, provisional_tasks
from service.routers.source import CachedRouters, RouterCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One class of one image's top-k."""

    label: str
    score: float
    task_id: str
    provisional: bool = False  # served by the closed-form head before its task is trained


@dataclass(frozen=True)
class ServedVersion:
    """One registry version as served. `network` is None while nothing has been learned (version None); `routers`
    is None then too, and under a method without routers (MoRAM, SETA)."""

    version: int | None
    manifest: Manifest | None
    network: ServedNetwork | None
    routers: CachedRouters | None
    labels: tuple[str, ...]
    task_ids: tuple[str, ...]
    loaded: LoadedTasks | None
    provisional_ids: frozenset[str] = frozenset()  # tasks served by the head alone (not trained yet)
    acceleration: Acceleration | None = None  # the GPU path's switches; None = the plain path

    @property
    def num_tasks(self) -> int:
        """Trained tasks (provisional ones are not counted)."""
        return 0 if self.manifest is None else len(self.manifest.tasks)

    @property
    def num_provisional_classes(self) -> int:
        return sum(1 for task_id in self.task_ids if task_id in self.provisional_ids)

    @property
    def served_task_ids(self) -> frozenset[str]:
        """Every task whose classes this version answers with, trained or provisional."""
        return frozenset(self.task_ids)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def router_source(self) -> RouterSource:
        """What the network routes through: the version's routers, or `NO_ROUTERS` for a network without any."""
        return NO_ROUTERS if self.routers is None else self.routers

    def probabilities(self, images: Tensor) -> Tensor:
        """(B, C) probabilities over every learned class for preprocessed images (B, 3, H, W)."""
        if self.network is None:
            raise RuntimeError("no classes have been learned yet")
        if self.acceleration is None:
            with torch.inference_mode():
                return self.network.predict_proba(images, self.router_source)
        with torch.inference_mode(), self.acceleration.autocast():
            return self.network.predict_proba(self.acceleration.inputs(images), self.router_source)

    def top(self, probabilities: Tensor, top_k: int) -> list[list[Prediction]]:
        """The `top_k` classes of each row, best first."""
        values, indices = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
        return [
            [
                Prediction(self.labels[i], float(v), self.task_ids[i], self.task_ids[i] in self.provisional_ids)
                for v, i in zip(row_v, row_i, strict=True)
            ]
            for row_v, row_i in zip(values.tolist(), indices.tolist(), strict=True)
        ]


def empty_version() -> ServedVersion:
    """What is served before anything has been learned."""
    return ServedVersion(None, None, None, None, (), (), None)


class SnapshotLoader:
    """Builds `ServedVersion`s from registry versions, reusing what the previous one already holds."""

    def __init__(self, store: ModelStore, cache: RouterCache, acceleration: Acceleration | None = None) -> None:
        self.store = store
        self.cache = cache
        self.acceleration = acceleration

    def load(self, manifest: Manifest, previous: ServedVersion | None) -> ServedVersion:
        """Verify and load `manifest`; raises (and changes nothing) if any of its files is bad."""
        reuse = None
        if previous is not None and previous.manifest is not None and previous.loaded is not None:
            reuse = (previous.manifest, previous.loaded)
        loaded = self.store.load_tasks(manifest, reuse)
        # Off the request path: the swap must hand requests a network that is ready to serve.
        loaded.bank.prepare_fast_path()
        network = self.store.network(loaded)
        routers = self.store.routers(manifest, self.cache)
        pairs = list(iter_labels(manifest))
        return ServedVersion(
            version=manifest.version,
            manifest=manifest,
            network=network,
            routers=routers,
            labels=tuple(label for label, _ in pairs),
            task_ids=tuple(task_id for _, task_id in pairs),
            loaded=loaded,
            provisional_ids=frozenset(task.task_id for task in provisional_tasks(manifest)),
            acceleration=self.acceleration,
        )


class ServingSlot:
    """Holds the version being `served` and swaps in newer ones; the swap is one reference assignment.

    Args:
        loader: Builds versions.
        on_swap: Called with the new version after each successful swap (metrics, logs).
        on_failure: Called with (version, error) when a version cannot be loaded; serving keeps the last good one.
    """

    def __init__(
        self,
        loader: SnapshotLoader,
        on_swap: Callable[[ServedVersion], None] | None = None,
        on_failure: Callable[[int, Exception], None] | None = None,
    ) -> None:
        self.loader = loader
        self.served = empty_version()
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._lock = threading.Lock()  # one load at a time; readers never take it
        self._refused: set[int] = set()

    def update_to(self, version: int | None) -> bool:
        """Load and serve `version` if it is newer than the served one; returns whether a swap happened."""
        if version is None:
            return False
        with self._lock:
            current = self.served
            if (current.version is not None and version <= current.version) or version in self._refused:
                return False
            started = time.perf_counter()
            try:
                manifest = self.loader.store.registry.load_manifest(version)
                candidate = self.loader.load(manifest, current)
            except Exception as exc:
                # A bad version is refused once; the next published version is tried afresh.
                self._refused.add(version)
                logger.error("version %d refused, still serving version %s: %s", version, current.version, exc)
                if self._on_failure is not None:
                    self._on_failure(version, exc)
                return False
            self.served = candidate
            logger.info(
                "serving version %d (%d tasks, %d classes), loaded in %.3fs",
                version,
                candidate.num_tasks,
                candidate.num_classes,
                time.perf_counter() - started,
            )
        if self._on_swap is not None:
            self._on_swap(candidate)
        return True
