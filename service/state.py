"""The composition root: everything a running server holds, built once in the lifespan and torn down in reverse
order. The parts live in their packages (inference, ingest, jobs, routers); this module only puts them together."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import torch

from model.backbone import SiteBackbone, make_transform
from model.config import ModelConfig
from registry import Registry, VersionWatcher
from service.inference.acceleration import Acceleration
from service.inference.backbone import load_backbone
from service.inference.batcher import MicroBatcher
from service.inference.preprocess import Preprocessor, PreprocessPool, default_workers
from service.inference.snapshot import ServedVersion, ServingSlot, SnapshotLoader
from service.ingest.limits import UploadLimits, upload_limits
from service.jobs import JobStore
from service.jobs.store import open_upload_store
from service.metrics import JobSnapshot, Metrics
from service.modelstore import ModelStore, open_registry
from service.routers.source import RouterCache, new_router_cache
from service.settings import Settings

logger = logging.getLogger(__name__)


def job_snapshot(jobs: JobStore) -> JobSnapshot:
    """Task counts and finished training durations, for the metrics collector."""
    durations = []
    for task in jobs.list_tasks():
        if task.started_at and task.finished_at and task.status == "ready":
            started = datetime.fromisoformat(task.started_at.replace("Z", "+00:00"))
            finished = datetime.fromisoformat(task.finished_at.replace("Z", "+00:00"))
            durations.append((finished - started).total_seconds())
    return JobSnapshot(jobs.counts_by_status(), durations)


def observe_servable(jobs: JobStore, metrics: Metrics, task_ids: set[str] | frozenset[str]) -> None:
    """Record, for tasks this server has just started answering with, the time since their 202."""
    now = time.time()
    for task_id in task_ids:
        try:
            created = datetime.fromisoformat(jobs.get(task_id).created_at.replace("Z", "+00:00")).timestamp()
        except Exception:  # a task of another job store (shared registry): nothing to measure against
            continue
        metrics.servable_seconds.observe(max(0.0, now - created))


@dataclass
class AppState:
    """The server's long-lived objects."""

    settings: Settings
    config: ModelConfig
    backbone: SiteBackbone
    registry: Registry
    cache: RouterCache
    serving: ServingSlot
    watcher: VersionWatcher
    jobs: JobStore
    batcher: MicroBatcher
    metrics: Metrics
    limits: UploadLimits
    preprocess: Preprocessor
    decoders: PreprocessPool
    ready: threading.Event

    def served(self) -> ServedVersion:
        """The version being served now (read it once per request: a swap may follow)."""
        return self.serving.served


def build_state(settings: Settings) -> AppState:
    """Load the backbone, open the registry and the job store, and serve the current version (blocking)."""
    torch.set_num_threads(settings.serve_threads)
    started = time.perf_counter()
    config, backbone = load_backbone(settings)
    device = settings.torch_device()
    acceleration = Acceleration.from_settings(settings)
    acceleration.prepare(backbone)
    registry = open_registry(settings)
    uploads = open_upload_store(settings.registry_url, settings.registry_endpoint_url)
    jobs = JobStore(settings.jobs_database, settings.uploads_dir, shared_uploads=uploads)
    holder: dict[str, Metrics] = {}
    cache = new_router_cache(
        device,
        settings.router_cache_bytes,
        settings.router_host_cache_bytes,
        on_load=lambda seconds, source: holder["metrics"].record_router_load(seconds, source),
    )
    metrics = Metrics(cache.stats, lambda: job_snapshot(jobs))
    holder["metrics"] = metrics
    store = ModelStore(registry, config, backbone, device)

    servable: set[str] | None = None  # tasks this server has answered with; None until the first version

    def on_swap(served: ServedVersion) -> None:
        nonlocal servable
        metrics.model_version.set(served.version or 0)
        metrics.tasks_learned.set(served.num_tasks)
        metrics.classes_learned.set(served.num_classes)
        metrics.classes_provisional.set(served.num_provisional_classes)
        task_ids = served.served_task_ids
        if servable is not None:  # the version served at start-up says nothing about how fast tasks became servable
            observe_servable(jobs, metrics, task_ids - servable)
        servable = set(task_ids)

    def on_failure(version: int, error: Exception) -> None:  # noqa: ARG001 - logged by ServingSlot
        metrics.version_load_failures.inc()

    serving = ServingSlot(SnapshotLoader(store, cache, acceleration), on_swap=on_swap, on_failure=on_failure)
    latest = registry.current_version()
    if latest is not None:
        # Refuse to start on a registry of another backbone/configuration: serving it would be wrong.
        store.check(registry.load_manifest(latest))
        serving.update_to(latest)

    def load_version(version: int) -> None:
        load_started = time.perf_counter()
        if serving.update_to(version):
            metrics.version_load_seconds.observe(time.perf_counter() - load_started)

    watcher = VersionWatcher(registry, settings.poll_interval_s, load_version)
    limits = upload_limits(settings)
    batcher = MicroBatcher(
        served=lambda: serving.served,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000,
        max_queue_images=settings.max_queue_images,
        threads=settings.serve_threads,
        on_batch=metrics.record_batch,
        on_queue=metrics.queue_images.set,
    )
    preprocess = Preprocessor(make_transform(backbone, config.image_size), limits, device, acceleration=acceleration)
    state = AppState(
        settings=settings,
        config=config,
        backbone=backbone,
        registry=registry,
        cache=cache,
        serving=serving,
        watcher=watcher,
        jobs=jobs,
        batcher=batcher,
        metrics=metrics,
        limits=limits,
        preprocess=preprocess,
        decoders=PreprocessPool(preprocess, default_workers()),
        ready=threading.Event(),
    )
    warm_up(state)
    logger.info(
        "loaded %s in %.1fs on %s; serving version %s",
        config.backbone,
        time.perf_counter() - started,
        device,
        serving.served.version,
    )
    return state


def warm_up(state: AppState) -> None:
    """One forward pass so the first request does not pay for lazy initialisation."""
    size = state.config.image_size or 224
    images = torch.zeros(1, 3, size, size, device=state.settings.torch_device())
    with torch.inference_mode():
        state.backbone.forward_plain(images)
        state.backbone.embed(images)  # compiles the trunk here, before ready, when CARE_COMPILE is on
        served = state.served()
        if served.network is not None:
            served.probabilities(images)
