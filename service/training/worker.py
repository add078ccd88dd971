"""The training worker: a process that learns queued tasks one at a time and publishes new versions.

It holds the lineage lease in the job database (so only one worker ever trains a lineage), takes queued tasks in
submission order, trains each with the model core's trainer, publishes a new registry version (which servers
hot-load) and marks the task ready. A task that fails is marked failed and the model stays unchanged. If the
process dies, the next worker re-queues the interrupted task and trains it again; a task that was published but
not yet marked ready is recognised in the registry and marked ready without training it twice.

Provisional versions (service/training/provisional.py): before training, every queued task's classes are added to the
served analytic head in closed form and published as a provisional version, in submission order. A task queued
while another trains is made provisional between two training steps (the progress callback), so it never waits
for a training run. Which tasks are provisional is recorded in the registry only (the latest manifest), so there
is no window between a publish and a job-store update: a crash at any point leaves either the old or the new
version, and the next worker carries on from whichever it finds. A task whose training fails loses its
provisional classes (a version without them is published before the task is marked failed).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from model.backbone import make_transform
from model.head import HeadStatistics
from model.moram import MoramTask, bank_with, learn_moram_task, served_moram_inputs
from model.routers import RouterSource
from model.seta import SetaTask, bank_after, learn_seta_task, served_seta_inputs
from model.trainer import LearnedTask, Lineage, TrainProgress, embed_images, learn_task, served_features
from registry import Manifest
from registry.owner import process_alive
from service.housekeeping import open_job_store
from service.inference.backbone import load_backbone
from service.inference.preprocess import Preprocessor, default_workers
from service.ingest.limits import upload_limits
from service.jobs import JobRecord, TaskNotFound, make_owner_id
from service.jobs.db import process_namespace
from service.modelstore import (
    NO_ROUTERS,
    LoadedTasks,
    ModelStore,
    NewTask,
    ProvisionalHead,
    ProvisionalTask,
    ServedNetwork,
    open_registry,
    provisional_tasks,
)
from service.routers.source import new_router_cache
from service.settings import Settings
from service.training.provisional import add_classes, rebuild, served_inputs

# A learned task and how the version that adds it reads images (`embed_images` output -> the served head's inputs).
Learned = tuple[LearnedTask | MoramTask | SetaTask, Callable[[Tensor], Tensor]]

logger = logging.getLogger(__name__)

LEASE = "lineage"
PROGRESS_INTERVAL_S = 0.5
MAX_ATTEMPTS = 3  # a task whose trainer died this often (it may be what kills it) is failed, not retried forever


class Stopped(Exception):
    """Training was interrupted because the worker is stopping or lost its lease."""


class TrainingWorker:
    """Owns the training of one lineage while it holds the lease."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.owner = make_owner_id()
        self.stop_event = threading.Event()
        self.lease_lost = threading.Event()
        self.config, self.backbone = load_backbone(settings)
        self.device = settings.torch_device()
        self.registry = open_registry(settings)
        self.store = ModelStore(self.registry, self.config, self.backbone, self.device)
        latest = self.registry.latest_manifest()
        if latest is not None:
            self.store.check(latest)  # as a server: refuse a registry of another backbone, configuration or method
        self.jobs = open_job_store(settings)  # a start-up sweep; deletes uploads once ready unless CARE_KEEP_UPLOADS
        self.cache = new_router_cache(self.device, settings.router_cache_bytes, settings.router_host_cache_bytes)
        self.preprocess = Preprocessor(
            make_transform(self.backbone, self.config.image_size), upload_limits(settings), self.device
        )
        self._loaded: tuple[Manifest, LoadedTasks] | None = None
        self._last_progress = 0.0
        self._last_queue_check = 0.0
        self._served_statistics: tuple[int, HeadStatistics] | None = None  # (version, what its head came from)
        self._no_provisional: set[str] = set()  # tasks whose provisional publish failed in this process
        self.ridge_ratio = settings.training().ridge_ratio

    # -- lease ------------------------------------------------------------------------------------------------

    def _take_over_dead_holder(self) -> None:
        """A holder that died in our pid namespace cannot renew; release its lease now rather than wait for the TTL."""
        holder = self.jobs.lease_holder(LEASE)
        if holder is None or holder == self.owner:
            return
        namespace, _, rest = holder.partition(":")
        pid_text = rest.partition(":")[0]
        if namespace != process_namespace() or not pid_text.isdigit():
            return  # another host or container: only its lease expiry can tell
        pid = int(pid_text)
        # Our own pid under another owner id is a predecessor whose pid we inherited (a restarted container).
        if pid == os.getpid() or not process_alive(pid):
            logger.warning("lease holder %s is dead; taking the lineage over", holder)
            self.jobs.release_lease(LEASE, holder)

    def _acquire(self) -> bool:
        self._take_over_dead_holder()
        if not self.jobs.acquire_lease(LEASE, self.owner, self.settings.worker_lease_ttl_s):
            return False
        self.lease_lost.clear()
        # We hold the lease, so nobody else is training: whatever is "training" belongs to a dead worker.
        self.jobs.recover_interrupted(max_attempts=MAX_ATTEMPTS)
        return True

    def _renew_forever(self) -> None:
        interval = self.settings.worker_lease_ttl_s / 3
        while not self.stop_event.wait(interval):
            try:
                if not self.jobs.renew_lease(LEASE, self.owner, self.settings.worker_lease_ttl_s):
                    self.lease_lost.set()
            except Exception:
                logger.exception("could not renew the lineage lease")

    # -- main loop --------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Train queued tasks until `stop_event` is set."""
        torch.set_num_threads(self.settings.train_threads)
        renewer = threading.Thread(target=self._renew_forever, name="care-lease", daemon=True)
        renewer.start()
        holding = False
        logger.info("worker %s started (%d torch threads)", self.owner, self.settings.train_threads)
        try:
            while not self.stop_event.is_set():
                if not holding or self.lease_lost.is_set():
                    holding = self._acquire()
                    if not holding:
                        self.stop_event.wait(self.settings.worker_poll_s)
                        continue
                self._reconcile_provisional()
                if self._make_provisional():
                    continue  # look again: more tasks may have been queued meanwhile
                job = self.jobs.claim_next(self.owner, lease=LEASE)
                if job is None:
                    self.stop_event.wait(self.settings.worker_poll_s)
                    continue
                self.process(job)
        finally:
            if holding:
                self.jobs.recover_interrupted()  # a task stopped mid-training goes back to the queue
                self.jobs.release_lease(LEASE, self.owner)
            self.stop_event.set()
            self.jobs.close()
            logger.info("worker %s stopped", self.owner)

    def process(self, job: JobRecord) -> None:
        """Train one claimed task and publish it, or mark it failed."""
        started = time.perf_counter()
        try:
            manifest = self.registry.latest_manifest()
            if manifest is not None and any(t.task_id == job.task_id for t in manifest.tasks):
                self._mark_already_published(job, manifest)
                return
            new_manifest, metrics = self._train_and_publish(job, manifest)
        except Stopped:
            logger.warning("training of %s interrupted; it will be trained again", job.task_id)
            return
        except Exception as exc:
            logger.exception("task %s failed", job.task_id)
            error = f"{type(exc).__name__}: {exc}"
            try:
                withdrawn = self._withdraw({job.task_id})
            except Exception:  # the main loop's reconciliation withdraws them before any new task becomes provisional
                logger.exception("could not withdraw the provisional classes of %s yet", job.task_id)
                withdrawn = None
            if withdrawn is not None:
                error += f"; its provisional classes were withdrawn in version {withdrawn.version}"
            self.jobs.mark_failed(job.task_id, error, owner=self.owner)
            return
        index = len(new_manifest.tasks) - 1
        self.jobs.mark_ready(
            job.task_id, index=index, model_version=new_manifest.version, metrics=metrics, owner=self.owner
        )
        logger.info(
            "task %s learned in %.1fs: version %d", job.task_id, time.perf_counter() - started, new_manifest.version
        )

    def _mark_already_published(self, job: JobRecord, manifest: Manifest) -> None:
        index = next(i for i, t in enumerate(manifest.tasks) if t.task_id == job.task_id)
        version = manifest.version
        while version > 1 and len(self.registry.load_manifest(version - 1).tasks) > index:
            version -= 1
        recorded = manifest.extra.get("task_metrics") if version == manifest.version else None
        metrics: dict[str, Any] = dict(recorded) if isinstance(recorded, dict) else {}
        logger.warning("task %s was published in version %d before a crash; marking it ready", job.task_id, version)
        self.jobs.mark_ready(job.task_id, index=index, model_version=version, metrics=metrics, owner=self.owner)

    def _task_tensors(
        self, task_id: str, classes: tuple[str, ...] | list[str], per_class: int = 0
    ) -> tuple[Tensor, Tensor]:
        """A task's preprocessed images and their labels 0..n-1, from its upload in the job store.

        With `per_class`, only the first `per_class` images of each class (in upload order) are read.
        """
        images, labels = self.jobs.load_upload(task_id)
        if per_class > 0:
            seen: dict[str, int] = {}
            keep = []
            for index, label in enumerate(labels):
                seen[label] = seen.get(label, 0) + 1
                if seen[label] <= per_class:
                    keep.append(index)
            images, labels = [images[i] for i in keep], [labels[i] for i in keep]
        names = [f"{i}" for i in range(len(images))]
        tensor = self.preprocess(list(zip(names, images, strict=True)))
        return tensor, torch.tensor([list(classes).index(label) for label in labels])

    def _train_and_publish(self, job: JobRecord, manifest: Manifest | None) -> tuple[Manifest, dict[str, Any]]:
        classes = list(job.classes)
        tensor, targets = self._task_tensors(job.task_id, classes)
        learned, served = self._learn(job.task_id, manifest, tensor, targets, len(classes))
        self._check_running()
        metrics = {key: round(value, 4) for key, value in learned.metrics.items()}
        parent, provisional = self._still_provisional(manifest, learned, served, job.task_id)
        self._check_running()
        new_manifest = self.store.publish(
            parent,
            [NewTask(learned, job.task_id, classes, job.name)],
            extra={"task_metrics": metrics},
            provisional=provisional,
        )
        if provisional is not None:
            self._served_statistics = (new_manifest.version, provisional.statistics)
        return new_manifest, metrics

    def _learn(
        self, task_id: str, manifest: Manifest | None, images: Tensor, labels: Tensor, num_classes: int
    ) -> Learned:
        """Learn the task after `manifest` with the configuration's method."""
        train = self.settings.training()

        def progress(update: TrainProgress) -> None:
            self._progress(task_id, update)

        if self.config.method == "moram":
            moram = self.store.load_moram_lineage(manifest, previous=self._loaded)
            if manifest is not None and moram.bank is not None:
                self._loaded = (manifest, LoadedTasks(moram.bank, moram.classifier))  # the head is re-read per version
            task = learn_moram_task(
                self.backbone, self.config, train, moram, images, labels, num_classes, progress=progress
            )
            bank = bank_with(moram.bank, task.atoms, self.config.moram_rank)
            return task, lambda hidden: served_moram_inputs(self.backbone, self.config, bank, task.classifier, hidden)
        if self.config.method == "seta":
            seta = self.store.load_seta_lineage(manifest, previous=self._loaded)
            if manifest is not None and seta.bank is not None:
                self._loaded = (manifest, LoadedTasks(seta.bank, seta.classifier))  # the head is re-read per version
            learned_seta = learn_seta_task(
                self.backbone, self.config, train, seta, images, labels, num_classes, progress=progress
            )
            served_bank = bank_after(seta.bank, learned_seta, self.config.expert_dim)
            return learned_seta, lambda hidden: served_seta_inputs(
                self.backbone, self.config, served_bank, learned_seta.classifier, hidden
            )
        lineage = self._lineage(manifest)
        learned = learn_task(self.backbone, self.config, train, lineage, images, labels, num_classes, progress=progress)
        return learned, lambda hidden: served_features(self.backbone, self.config, lineage, learned, hidden)

    # -- provisional versions ---------------------------------------------------------------------------------

    def _provisional_enabled(self) -> bool:
        return self.settings.provisional and self.config.head == "analytic"

    def _served(self, manifest: Manifest) -> tuple[ServedNetwork, RouterSource, LoadedTasks]:
        """`manifest` as servers serve it (its bank is shared with the training lineage when the tasks agree)."""
        loaded = self.store.load_tasks(manifest, previous=self._loaded)
        self._loaded = (manifest, loaded)
        routers = self.store.routers(manifest, self.cache)
        return self.store.network(loaded), NO_ROUTERS if routers is None else routers, loaded

    def _statistics_of(self, manifest: Manifest) -> HeadStatistics:
        if self._served_statistics is None or self._served_statistics[0] != manifest.version:
            self._served_statistics = (manifest.version, self.store.load_served_statistics(manifest))
        return self._served_statistics[1]

    def _make_provisional(self) -> bool:
        """Publish a provisional version for each queued task without one, in submission order; True if any."""
        if not self._provisional_enabled():
            return False
        manifest = self.registry.latest_manifest()
        if manifest is None:
            return False  # the first task defines the feature space: it is trained, not made provisional
        served = {t.task_id for t in manifest.tasks} | {t.task_id for t in provisional_tasks(manifest)}
        pending = [
            t
            for t in self.jobs.list_tasks()
            if t.status == "queued" and t.task_id not in served and t.task_id not in self._no_provisional
        ]
        for job in pending:
            self._check_running()
            try:
                manifest = self._publish_provisional(manifest, job)
            except Stopped:
                raise
            except Exception:
                # The task is still trained as usual; only its early answers are lost.
                logger.exception("could not make task %s provisional; it will be served once trained", job.task_id)
                self._no_provisional.add(job.task_id)
                manifest = self.registry.latest_manifest() or manifest
        return bool(pending)

    def _publish_provisional(self, manifest: Manifest, job: JobRecord) -> Manifest:
        started = time.perf_counter()
        threads = torch.get_num_threads()
        # Short and latency-bound, and training is paused meanwhile: every core it may use (64 images at 224 px
        # on EfficientNet-Lite0, the 2-core box: 2.0 s on one thread, 1.3 s on two).
        torch.set_num_threads(self.settings.provisional_threads or default_workers())
        try:
            return self._publish_provisional_now(manifest, job, started)
        finally:
            torch.set_num_threads(threads)

    def _publish_provisional_now(self, manifest: Manifest, job: JobRecord, started: float) -> Manifest:
        marks = [started]
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # a training run may be paused around us
            images, labels = self._task_tensors(job.task_id, job.classes, self.settings.provisional_images_per_class)
            network, routers, loaded = self._served(manifest)
            if loaded.head is None:
                raise ValueError(f"version {manifest.version} has no analytic head")
            previous = self._statistics_of(manifest)
            marks.append(time.perf_counter())
            inputs = served_inputs(network, routers, images)
            marks.append(time.perf_counter())
            statistics, head = add_classes(previous, loaded.head, inputs, labels, len(job.classes), self.ridge_ratio)
            marks.append(time.perf_counter())
        tasks = [*provisional_tasks(manifest), ProvisionalTask(job.task_id, job.name, tuple(job.classes))]
        self._check_running()
        published = self.store.publish_provisional(
            manifest,
            loaded.classifier,
            ProvisionalHead(tasks, head, statistics),
            extra={"provisional_seconds": round(time.perf_counter() - started, 3)},
        )
        marks.append(time.perf_counter())
        self._served_statistics = (published.version, statistics)
        load, forward, solve, publish = (b - a for a, b in itertools.pairwise(marks))
        logger.info(
            "task %s is provisional in version %d (%d images, %.1fs: load %.2f forward %.2f solve %.2f publish %.2f)",
            job.task_id,
            published.version,
            len(images),
            marks[-1] - started,
            load,
            forward,
            solve,
            publish,
        )
        return published

    def _still_provisional(
        self,
        manifest: Manifest | None,
        learned: LearnedTask | MoramTask | SetaTask,
        served: Callable[[Tensor], Tensor],
        trained_id: str,
    ) -> tuple[Manifest | None, ProvisionalHead | None]:
        """The parent to publish a trained task on, and the provisional tasks re-embedded through the new version.

        The head statistics of the trained version are the trained features' (`learned.head_statistics`); every
        task still provisional is embedded again through the new version and added after them. Tasks made
        provisional meanwhile (between embeddings) are picked up until none is missing.
        """
        if manifest is None or learned.head is None or learned.head_statistics is None:
            return manifest, None
        embedded: dict[str, tuple[Tensor, Tensor, int]] = {}
        while True:
            self._check_running()
            latest = self.registry.latest_manifest()
            if latest is None or latest.tasks != manifest.tasks:
                raise RuntimeError("the registry changed under the worker: its trained tasks are not the lineage's")
            remaining = [p for p in provisional_tasks(latest) if p.task_id != trained_id]
            missing = [p for p in remaining if p.task_id not in embedded]
            if not missing:
                break
            for pending in missing:
                with torch.no_grad():
                    images, labels = self._task_tensors(
                        pending.task_id, pending.classes, self.settings.provisional_images_per_class
                    )
                    hidden = embed_images(self.backbone, images.contiguous(memory_format=torch.channels_last))
                    inputs = served(hidden)
                embedded[pending.task_id] = (inputs, labels, len(pending.classes))
                self._maybe_make_provisional()
        if not remaining:
            return latest, None
        statistics, head = rebuild(
            learned.head_statistics,
            learned.head.scale,
            learned.head.temperature,
            [embedded[p.task_id] for p in remaining],
            self.ridge_ratio,
        )
        return latest, ProvisionalHead(remaining, head, statistics)

    def _withdraw(self, task_ids: set[str]) -> Manifest | None:
        """Publish the latest version without the provisional classes of `task_ids`; None if none were served."""
        latest = self.registry.latest_manifest()
        current = provisional_tasks(latest)
        if latest is None or not any(p.task_id in task_ids for p in current):
            return None
        keep = [p for p in current if p.task_id not in task_ids]
        with torch.no_grad():
            network, routers, loaded = self._served(latest)
            trained = self.store.load_statistics(latest)[1]
            if loaded.head is None or trained is None:
                raise ValueError(f"version {latest.version} has no analytic head")
            entries = []
            for pending in keep:
                images, labels = self._task_tensors(
                    pending.task_id, pending.classes, self.settings.provisional_images_per_class
                )
                entries.append((served_inputs(network, routers, images), labels, len(pending.classes)))
            statistics, head = rebuild(trained, loaded.head.scale, loaded.head.temperature, entries, self.ridge_ratio)
        published = self.store.publish_provisional(latest, loaded.classifier, ProvisionalHead(keep, head, statistics))
        self._served_statistics = (published.version, statistics)
        logger.warning("provisional classes of %s withdrawn in version %d", sorted(task_ids), published.version)
        return published

    def _reconcile_provisional(self) -> None:
        """Withdraw provisional classes of tasks that are no longer queued or training (failed while we were down)."""
        latest = self.registry.latest_manifest()
        stale = set()
        for pending in provisional_tasks(latest):
            try:
                live = self.jobs.get(pending.task_id).status in ("queued", "training")
            except TaskNotFound:
                live = False
            if not live:
                stale.add(pending.task_id)
        if stale:
            self._withdraw(stale)

    def _maybe_make_provisional(self) -> None:
        """Between training steps: make newly queued tasks provisional, at most every PROGRESS_INTERVAL_S."""
        now = time.monotonic()
        if now - self._last_queue_check < PROGRESS_INTERVAL_S:
            return
        self._last_queue_check = now
        try:
            self._make_provisional()
        except Stopped:
            raise
        except Exception:  # never let the provisional lane fail the training run it interrupts
            logger.exception("could not look for tasks to make provisional; the next check retries")

    def _lineage(self, manifest: Manifest | None) -> Lineage:
        if manifest is None:
            return self.store.load_lineage(None, self.cache)
        lineage = self.store.load_lineage(manifest, self.cache, previous=self._loaded)
        assert lineage.bank is not None
        self._loaded = (manifest, LoadedTasks(lineage.bank, lineage.classifier))  # the head is re-read per version
        return lineage

    def _check_running(self) -> None:
        if self.stop_event.is_set():
            raise Stopped("the worker is stopping")
        if self.lease_lost.is_set():
            raise Stopped("the lineage lease was lost to another worker")

    def _progress(self, task_id: str, progress: TrainProgress) -> None:
        self._check_running()
        self._maybe_make_provisional()  # preempt between steps: a task queued now does not wait for this run
        now = time.monotonic()
        last_step = progress.stage == "adapt" and progress.step == progress.steps
        if now - self._last_progress < PROGRESS_INTERVAL_S and not last_step and progress.stage != "align":
            return
        self._last_progress = now
        self.jobs.update_progress(
            task_id,
            {
                "stage": progress.stage,
                "epoch": progress.epoch,
                "epochs": progress.epochs,
                "step": progress.step,
                "steps": progress.steps,
                "loss": round(progress.loss, 5),
            },
            owner=self.owner,
        )


def run_worker(settings: Settings) -> int:
    """`care-serve worker`: run until SIGTERM/SIGINT."""
    worker = TrainingWorker(settings)

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping after the current step", signum)
        worker.stop_event.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    worker.run()
    return 0
