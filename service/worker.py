"""The training worker: a process that learns queued tasks one at a time and publishes new versions.

It holds the lineage lease in the job database (so only one worker ever trains a lineage), takes queued tasks in
submission order, trains each with the model core's trainer, publishes a new registry version (which servers
hot-load) and marks the task ready. A task that fails is marked failed and the model stays unchanged. If the
process dies, the next worker re-queues the interrupted task and trains it again; a task that was published but
not yet marked ready is recognised in the registry and marked ready without training it twice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import torch

from model.backbone import make_transform
from model.trainer import Lineage, TrainProgress, learn_task
from registry import Manifest, Registry
from service.housekeeping import open_job_store
from service.jobs import TaskRecord, make_owner_id
from service.jobs_db import process_namespace
from service.modelstore import LoadedTasks, ModelStore, NewTask, new_router_cache
from service.settings import Settings
from service.state import Preprocessor, load_backbone, upload_limits

logger = logging.getLogger(__name__)

LEASE = "lineage"
PROGRESS_INTERVAL_S = 0.5
MAX_ATTEMPTS = 3  # a task whose trainer died this often (it may be what kills it) is failed, not retried forever


class Stopped(Exception):
    """Training was interrupted because the worker is stopping or lost its lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrainingWorker:
    """Owns the training of one lineage while it holds the lease."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.owner = make_owner_id()
        self.stop_event = threading.Event()
        self.lease_lost = threading.Event()
        self.config, self.backbone = load_backbone(settings)
        self.device = settings.torch_device()
        self.registry = Registry.from_path(settings.registry_dir)
        self.store = ModelStore(self.registry, self.config, self.backbone, self.device)
        self.jobs = open_job_store(settings)  # a start-up sweep; deletes uploads once ready unless CARE_KEEP_UPLOADS
        self.cache = new_router_cache(self.device, settings.router_cache_bytes, settings.router_host_cache_bytes)
        self.preprocess = Preprocessor(
            make_transform(self.backbone, self.config.image_size), upload_limits(settings), self.device
        )
        self._loaded: tuple[Manifest, LoadedTasks] | None = None
        self._last_progress = 0.0

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
        if pid == os.getpid() or not _pid_alive(pid):
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
                task = self.jobs.claim_next(self.owner, lease=LEASE)
                if task is None:
                    self.stop_event.wait(self.settings.worker_poll_s)
                    continue
                self.process(task)
        finally:
            if holding:
                self.jobs.recover_interrupted()  # a task stopped mid-training goes back to the queue
                self.jobs.release_lease(LEASE, self.owner)
            self.stop_event.set()
            self.jobs.close()
            logger.info("worker %s stopped", self.owner)

    def process(self, task: TaskRecord) -> None:
        """Train one claimed task and publish it, or mark it failed."""
        started = time.perf_counter()
        try:
            manifest = self.registry.latest_manifest()
            if manifest is not None and any(t.task_id == task.task_id for t in manifest.tasks):
                self._mark_already_published(task, manifest)
                return
            new_manifest, metrics = self._train_and_publish(task, manifest)
        except Stopped:
            logger.warning("training of %s interrupted; it will be trained again", task.task_id)
            return
        except Exception as exc:
            logger.exception("task %s failed", task.task_id)
            self.jobs.mark_failed(task.task_id, f"{type(exc).__name__}: {exc}", owner=self.owner)
            return
        index = len(new_manifest.tasks) - 1
        self.jobs.mark_ready(
            task.task_id, index=index, model_version=new_manifest.version, metrics=metrics, owner=self.owner
        )
        logger.info("task %s learned in %.1fs: version %d", task.task_id, time.perf_counter() - started, index + 1)

    def _mark_already_published(self, task: TaskRecord, manifest: Manifest) -> None:
        index = next(i for i, t in enumerate(manifest.tasks) if t.task_id == task.task_id)
        version = manifest.version
        while version > 1 and len(self.registry.load_manifest(version - 1).tasks) > index:
            version -= 1
        recorded = manifest.extra.get("task_metrics") if version == manifest.version else None
        metrics: dict[str, Any] = dict(recorded) if isinstance(recorded, dict) else {}
        logger.warning("task %s was published in version %d before a crash; marking it ready", task.task_id, version)
        self.jobs.mark_ready(task.task_id, index=index, model_version=version, metrics=metrics, owner=self.owner)

    def _train_and_publish(self, task: TaskRecord, manifest: Manifest | None) -> tuple[Manifest, dict[str, Any]]:
        images, labels = self.jobs.load_upload(task.task_id)
        classes = list(task.classes)
        names = [f"{i}" for i in range(len(images))]
        tensor = self.preprocess(list(zip(names, images, strict=True)))
        targets = torch.tensor([classes.index(label) for label in labels])
        lineage = self._lineage(manifest)
        learned = learn_task(
            self.backbone,
            self.config,
            self.settings.training(),
            lineage,
            tensor,
            targets,
            len(classes),
            progress=lambda p: self._progress(task.task_id, p),
        )
        self._check_running()
        metrics = {key: round(value, 4) for key, value in learned.metrics.items()}
        new_manifest = self.store.publish(
            manifest,
            [NewTask(learned, task.task_id, classes, task.name)],
            extra={"task_metrics": metrics},
        )
        return new_manifest, metrics

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
