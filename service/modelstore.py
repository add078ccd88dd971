"""The registry in the model's terms: publishing learned tasks and reading them back.

`model/` knows tensors and modules, `registry/` knows files and manifests; this module is where the two meet
(the import contract keeps them apart). The server reads versions through it (`service.inference.snapshot`), the
worker publishes and continues them (`service.training.worker`): it sits below both, and reads routers on demand
through `service.routers`. Layout of one version's files:

    tasks/{index:04d}-{task_id}/experts.safetensors   experts + perceptrons of a task   (resident when served)
    tasks/{index:04d}-{task_id}/routers.safetensors   routers of a task                  (loaded through the cache)
    tasks/{index:04d}-{task_id}/atoms.safetensors     a MoRAM task's atoms (instead of experts and routers)
    versions/{first:06d}/shared.safetensors           E_bar, written with version 1 and reused (CaRE)
    versions/{version:06d}/shared.safetensors         the shared experts as of this version (SETA: every version)
    versions/{version:06d}/classifier.safetensors     the cosine classifier as of this version
    trainer/{version:06d}.safetensors                 per-class statistics (trainer only)

Provisional (head-only) tasks: a version may serve classes that have no experts yet. They are listed in
`manifest.extra["provisional"]` (task id, name, classes; in head order, after every class of `manifest.tasks`),
the classifier file's analytic head covers them (the cosine classifier does not), and the version's trainer state
holds, under `provisional.*`, the statistics that head was solved from (trained classes plus provisional ones).
The trained head statistics over `manifest.tasks` (`head.*`) are in the trainer state of the version named by
`manifest.extra["head_state_version"]` (this version when absent), so a provisional version does not copy them.
`manifest.tasks` only ever lists trained tasks: routing, experts and routers are untouched by provisional ones.

Methods (`ModelConfig.method`, recorded in every manifest): a CaRE version's tasks have `experts` and `routers`
files and the version a `shared` file; a MoRAM version's tasks have one `atoms` file each (model/moram.py) and the
version no shared file; a SETA version's tasks have one `experts` file each (kind "task-seta": the unique experts
and gate rows) and the version its own `shared` file, because the shared experts move with every task, while its
trainer state also holds the anchor's importance (model/seta.py). All have the classifier file and the same trainer
state (the analytic head's statistics). Whichever the method, `network` builds what the version serves: a
`ServedNetwork`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from model import artifacts
from model.alignment import ClassStatistics
from model.backbone import SiteBackbone
from model.bank import ExpertBank
from model.config import ModelConfig
from model.head import AnalyticHead, HeadStatistics
from model.moram import AtomBank, MoramLineage, MoramModel, MoramTask
from model.network import CareModel
from model.routers import ResidentRouters, RouterSource
from model.seta import SetaBank, SetaLineage, SetaModel, SetaTask
from model.trainer import LearnedTask, Lineage
from registry import Manifest, Registry, TaskRecord, check_compatible, task_file_path, version_file_path
from service.routers.source import ROLE_ROUTERS, CachedRouters, RouterCache
from service.settings import Settings

logger = logging.getLogger(__name__)

ROLE_EXPERTS = "experts"
ROLE_SHARED = "shared"
ROLE_CLASSIFIER = "classifier"
ROLE_ATOMS = "atoms"  # a MoRAM task's atoms: its only file (no routers, no shared expert)

EXTRA_PROVISIONAL = "provisional"  # manifest.extra: the head-only tasks, in head order after the trained ones
EXTRA_HEAD_STATE = "head_state_version"  # manifest.extra: the version whose trainer state has the trained head.*
STATE_PROVISIONAL = "provisional"  # trainer-state prefix of the statistics a head with provisional classes came from


class ServedNetwork(Protocol):
    """What serving and the provisional path ask of a version's network, whatever the method.

    `CareModel` routes through the version's routers; `MoramModel` has none and ignores the argument (it is handed
    `NO_ROUTERS`). A method plugs into the service by giving its network these calls.
    """

    @property
    def backbone(self) -> SiteBackbone: ...

    @property
    def head(self) -> AnalyticHead | None: ...

    @property
    def num_tasks(self) -> int: ...

    def predict_proba(self, images: Tensor, routers: RouterSource) -> Tensor:
        """Probabilities (B, C) over every served class of preprocessed images."""
        ...

    def head_inputs_from_embedding(self, hidden: Tensor, routers: RouterSource) -> Tensor:
        """The served head's inputs of `backbone.embed` output."""
        ...


NO_ROUTERS: RouterSource = ResidentRouters()  # what a network without routers (MoRAM) is handed


@dataclass(frozen=True)
class ProvisionalTask:
    """A task whose classes are served by the head alone, before its experts are trained."""

    task_id: str
    name: str | None
    classes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "name": self.name, "classes": list(self.classes)}


def provisional_tasks(manifest: Manifest | None) -> list[ProvisionalTask]:
    """The provisional tasks of a version, in head order (after every trained class)."""
    if manifest is None:
        return []
    raw = manifest.extra.get(EXTRA_PROVISIONAL) or []
    if not isinstance(raw, list):
        raise ValueError(f"version {manifest.version}: extra.{EXTRA_PROVISIONAL} is not a list")
    tasks = []
    for entry in raw:
        classes = entry.get("classes") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(classes, list):
            raise ValueError(f"version {manifest.version}: malformed provisional task {entry!r}")
        name = entry.get("name")
        tasks.append(
            ProvisionalTask(
                str(entry["task_id"]), None if name is None else str(name), tuple(str(label) for label in classes)
            )
        )
    return tasks


def head_state_version(manifest: Manifest) -> int:
    """The version whose trainer state holds the trained head statistics of `manifest`'s tasks."""
    value = manifest.extra.get(EXTRA_HEAD_STATE, manifest.version)
    if not isinstance(value, int) or not 1 <= value <= manifest.version:
        raise ValueError(f"version {manifest.version}: bad extra.{EXTRA_HEAD_STATE} {value!r}")
    return value


@dataclass(frozen=True)
class ProvisionalHead:
    """Head-only classes on top of a version's trained tasks.

    Attributes:
        tasks: The provisional tasks, in head order.
        head: The analytic head over every trained class and then every provisional one.
        statistics: What `head` was solved from (trained classes' statistics plus the provisional ones).
    """

    tasks: Sequence[ProvisionalTask]
    head: AnalyticHead
    statistics: HeadStatistics


def _provisional_state(provisional: ProvisionalHead) -> dict[str, Tensor]:
    return {
        f"{STATE_PROVISIONAL}.{key}": value.detach().cpu().contiguous()
        for key, value in provisional.statistics.to_tensors().items()
    }


def open_registry(settings: Settings) -> Registry:
    """The registry the settings name: S3-compatible storage when ``registry_url`` is set, else the local directory.

    The S3 backend (and boto3, the ``s3`` extra) is imported only when it is used.
    """
    if settings.registry_url is None:
        return Registry.from_path(settings.registry_dir)
    from registry.s3 import S3Backend

    backend = S3Backend.from_url(
        settings.registry_url, cache_dir=settings.registry_cache_dir, endpoint_url=settings.registry_endpoint_url
    )
    return Registry(backend)


@dataclass(frozen=True)
class NewTask:
    """A learned task and the names it is published under."""

    learned: LearnedTask | MoramTask | SetaTask
    task_id: str
    classes: list[str]
    name: str | None = None


@dataclass(frozen=True)
class LoadedTasks:
    """The resident tensors of a version: the bank (on device; CaRE's experts, MoRAM's atoms or SETA's experts and
    gates), the cosine classifier and the analytic head."""

    bank: ExpertBank | AtomBank | SetaBank
    classifier: Tensor
    head: AnalyticHead | None = None


class ModelStore:
    """Publishes learned tasks to a registry and reads versions back as model objects.

    Args:
        registry: The registry.
        config: The running model config; versions made under another one are refused.
        backbone: The running backbone (for site dimensions and the feature size).
        device: Where resident tensors go.
    """

    def __init__(self, registry: Registry, config: ModelConfig, backbone: SiteBackbone, device: torch.device) -> None:
        self.registry = registry
        self.config = config
        self.backbone = backbone
        self.device = device
        self.site_dims = list(backbone.site_dims)

    def check(self, manifest: Manifest) -> None:
        """Refuse a version made for another backbone or configuration."""
        check_compatible(manifest, backbone=self.config.backbone, model_config=self.config.to_dict())

    def _metadata(self, kind: str, **extra: str | int) -> dict[str, str]:
        return artifacts.metadata(self.config, kind, self.site_dims, **extra)

    def publish(
        self,
        parent: Manifest | None,
        new_tasks: Sequence[NewTask],
        extra: Mapping[str, Any] | None = None,
        provisional: ProvisionalHead | None = None,
    ) -> Manifest:
        """Publish the version that adds `new_tasks` (in order) on top of `parent` (None before the first task).

        The service publishes one task per version; benchmarks publish many at once. The classifier and the
        trainer state are the last task's (they cover every class). With `provisional` (and tasks in it), the
        served head is its head, over the trained classes and then the provisional ones, and the version lists
        them; the trainer state keeps the trained statistics besides it. Provisional tasks of `parent` that are
        not in `provisional` are not carried over.
        """
        if not new_tasks:
            raise ValueError("nothing to publish")
        version = 1 if parent is None else parent.version + 1
        last = new_tasks[-1].learned
        classifier_path = version_file_path(version, ROLE_CLASSIFIER)
        new_files: dict[str, tuple[Mapping[str, Tensor], Mapping[str, str]]] = {
            classifier_path: (
                artifacts.classifier_tensors(
                    last.classifier, provisional.head if provisional is not None and provisional.tasks else last.head
                ),
                self._metadata(artifacts.KIND_CLASSIFIER, num_classes=int(last.classifier.shape[0])),
            )
        }
        version_files = {ROLE_CLASSIFIER: classifier_path}
        if self.config.method == "care" and parent is None:
            shared = new_tasks[0].learned.shared if isinstance(new_tasks[0].learned, LearnedTask) else None
            if shared is None:
                raise ValueError("the first version needs the shared expert trained with the first task")
            version_files[ROLE_SHARED] = version_file_path(version, ROLE_SHARED)
            new_files[version_files[ROLE_SHARED]] = (
                artifacts.shared_tensors(shared),
                self._metadata(artifacts.KIND_SHARED),
            )
        elif self.config.method == "care":
            assert parent is not None
            version_files[ROLE_SHARED] = parent.version_files[ROLE_SHARED]
        elif self.config.method == "seta":
            if not isinstance(last, SetaTask):
                raise ValueError("a SETA registry publishes SETA tasks")
            version_files[ROLE_SHARED] = version_file_path(version, ROLE_SHARED)
            new_files[version_files[ROLE_SHARED]] = (
                artifacts.stacks_tensors(ROLE_SHARED, last.shared),
                self._metadata(artifacts.KIND_SHARED),
            )
        tasks: list[TaskRecord] = [] if parent is None else list(parent.tasks)
        for new in new_tasks:
            index = new.learned.index
            if index != len(tasks):
                raise ValueError(f"task {new.task_id} was learned as task {index}, but it would be task {len(tasks)}")
            files = self._task_files(new, index, new_files)
            tasks.append(TaskRecord(task_id=new.task_id, name=new.name, classes=tuple(new.classes), files=files))
        statistics = last.statistics if isinstance(last, LearnedTask) else None
        trainer_state = artifacts.trainer_state_tensors(
            None if statistics is None else statistics.to_tensors(),
            None if last.head_statistics is None else last.head_statistics.to_tensors(),
            last.importance if isinstance(last, SetaTask) else None,
        )
        extra = dict(extra or {})
        if provisional is not None and provisional.tasks:
            trainer_state.update(_provisional_state(provisional))
            extra[EXTRA_PROVISIONAL] = [task.to_json() for task in provisional.tasks]
        return self.registry.publish(
            parent=None if parent is None else parent.version,
            backbone=self.config.backbone,
            model_config=self.config.to_dict(),
            tasks=tasks,
            new_files=new_files,
            version_files=version_files,
            trainer_state=trainer_state,
            extra=extra,
        )

    def _task_files(
        self, new: NewTask, index: int, new_files: dict[str, tuple[Mapping[str, Tensor], Mapping[str, str]]]
    ) -> dict[str, str]:
        """Add the files of one new task to `new_files`; returns its record's role -> path."""
        learned = new.learned
        if self.config.method == "seta":
            if not isinstance(learned, SetaTask):
                raise ValueError(
                    f"task {new.task_id}: a SETA registry publishes SETA tasks, got {type(learned).__name__}"
                )
            path = task_file_path(index, new.task_id, ROLE_EXPERTS)
            new_files[path] = (
                artifacts.seta_task_tensors(learned.unique, learned.gates),
                self._metadata(artifacts.KIND_TASK_SETA, task_index=index, num_classes=len(new.classes)),
            )
            return {ROLE_EXPERTS: path}
        if self.config.method == "moram":
            if not isinstance(learned, MoramTask):
                raise ValueError(f"task {new.task_id}: a MoRAM registry publishes MoRAM tasks, got a CaRE one")
            atoms_path = task_file_path(index, new.task_id, ROLE_ATOMS)
            new_files[atoms_path] = (
                artifacts.task_atom_tensors(learned.atoms),
                self._metadata(artifacts.KIND_TASK_ATOMS, task_index=index, num_classes=len(new.classes)),
            )
            return {ROLE_ATOMS: atoms_path}
        if not isinstance(learned, LearnedTask):
            raise ValueError(f"task {new.task_id}: a CaRE registry publishes CaRE tasks, got a MoRAM one")
        experts_path = task_file_path(index, new.task_id, ROLE_EXPERTS)
        routers_path = task_file_path(index, new.task_id, ROLE_ROUTERS)
        new_files[experts_path] = (
            artifacts.task_expert_tensors(learned.task),
            self._metadata(artifacts.KIND_TASK_EXPERTS, task_index=index, num_classes=len(new.classes)),
        )
        new_files[routers_path] = (
            artifacts.task_router_tensors(learned.task),
            self._metadata(artifacts.KIND_TASK_ROUTERS, task_index=index),
        )
        return {ROLE_EXPERTS: experts_path, ROLE_ROUTERS: routers_path}

    def publish_provisional(
        self, parent: Manifest, classifier: Tensor, provisional: ProvisionalHead, extra: Mapping[str, Any] | None = None
    ) -> Manifest:
        """Publish `parent`'s trained tasks with another set of provisional tasks (added, or some withdrawn).

        Only a classifier file (the parent's cosine classifier `classifier`, the new head) and the provisional
        statistics are written; the task files, the shared expert and the trained statistics are the parent's.
        Same crash safety and compare-and-swap on `parent` as every publish.
        """
        version = parent.version + 1
        classifier_path = version_file_path(version, ROLE_CLASSIFIER)
        new_files: dict[str, tuple[Mapping[str, Tensor], Mapping[str, str]]] = {
            classifier_path: (
                artifacts.classifier_tensors(classifier, provisional.head),
                self._metadata(artifacts.KIND_CLASSIFIER, num_classes=int(classifier.shape[0])),
            )
        }
        record = dict(extra or {})
        record[EXTRA_HEAD_STATE] = head_state_version(parent)
        record[EXTRA_PROVISIONAL] = [task.to_json() for task in provisional.tasks]
        return self.registry.publish(
            parent=parent.version,
            backbone=self.config.backbone,
            model_config=self.config.to_dict(),
            tasks=list(parent.tasks),
            new_files=new_files,
            version_files={**parent.version_files, ROLE_CLASSIFIER: classifier_path},
            trainer_state=_provisional_state(provisional) if provisional.tasks else None,
            extra=record,
        )

    def _read(self, path: str, kind: str) -> dict[str, Tensor]:
        artifacts.check_metadata(self.registry.read_metadata(path), self.config, kind, path)
        # Read into owned memory rather than mapping: served tensors must not depend on the file staying intact.
        return self.registry.load_tensors(path)

    def load_tasks(self, manifest: Manifest, previous: tuple[Manifest, LoadedTasks] | None = None) -> LoadedTasks:
        """Verify a version's files and build its resident tensors.

        When `previous` holds a loaded version whose tasks are a prefix of this one's, only the new tasks are read
        and appended to its bank (hot-loading one more task does not re-read hundreds of files). The bank is CaRE's
        experts or MoRAM's atoms, as the configuration's method says.
        """
        self.check(manifest)
        self.registry.verify(manifest)
        classifier_path = manifest.version_files[ROLE_CLASSIFIER]
        num_classes = sum(len(t.classes) for t in manifest.tasks)
        head_classes = num_classes + sum(len(t.classes) for t in provisional_tasks(manifest))
        classifier_tensors = self._read(classifier_path, artifacts.KIND_CLASSIFIER)
        classifier = artifacts.classifier_from_tensors(
            classifier_tensors, num_classes, self.backbone.feature_dim, classifier_path
        ).to(self.device)
        head = artifacts.head_from_tensors(classifier_tensors, self.config, head_classes, classifier_path)
        if head is not None:
            head = head.to(self.device)
        start, reused = 0, None
        if previous is not None:
            old_manifest, old_tasks = previous
            same_shared = old_manifest.version_files.get(ROLE_SHARED) == manifest.version_files.get(ROLE_SHARED)
            if same_shared and manifest.tasks[: len(old_manifest.tasks)] == old_manifest.tasks:
                start, reused = len(old_manifest.tasks), old_tasks.bank
        if self.config.method == "moram":
            atoms = self._load_atoms(manifest, start, reused)
            return LoadedTasks(atoms, classifier, head)
        if self.config.method == "seta":
            return LoadedTasks(self._load_seta(manifest, previous), classifier, head)
        bank = reused if isinstance(reused, ExpertBank) else None
        if bank is None:
            start = 0
            shared_path = manifest.version_files[ROLE_SHARED]
            shared = self._read(shared_path, artifacts.KIND_SHARED)
            bank = artifacts.empty_bank(shared, self.config, self.site_dims, shared_path).to(self.device)
        for index in range(start, len(manifest.tasks)):
            task = manifest.tasks[index]
            path = task.files[ROLE_EXPERTS]
            tensors = self._read(path, artifacts.KIND_TASK_EXPERTS)
            experts, perceptrons = artifacts.task_stacks_from_tensors(
                tensors, self.config, self.site_dims, len(task.classes), path
            )
            bank = bank.append([e.to(self.device) for e in experts], [p.to(self.device) for p in perceptrons])
        return LoadedTasks(bank, classifier, head)

    def _load_atoms(self, manifest: Manifest, start: int, reused: ExpertBank | AtomBank | SetaBank | None) -> AtomBank:
        """A MoRAM version's atoms: `reused` (the first `start` tasks' bank) with the later tasks' atoms appended."""
        bank = reused if isinstance(reused, AtomBank) and start > 0 else None
        first = start if bank is not None else 0
        new = []
        for task in manifest.tasks[first:]:
            path = task.files[ROLE_ATOMS]
            tensors = self._read(path, artifacts.KIND_TASK_ATOMS)
            atoms = artifacts.atoms_from_tensors(tensors, self.config, self.site_dims, path)
            new.append([stack.to(self.device) for stack in atoms])
        if bank is None:
            if not new:
                raise ValueError(f"version {manifest.version} has no trained task")
            return AtomBank.of_tasks(new, self.config.moram_rank)
        for atoms in new:
            bank = bank.append(atoms)
        return bank

    def _load_seta(self, manifest: Manifest, previous: tuple[Manifest, LoadedTasks] | None) -> SetaBank:
        """A SETA version's bank: its own shared experts, with `previous`'s unique experts and gate rows reused when
        its tasks are a prefix of this version's (they never change once trained; the shared experts do)."""
        shared_path = manifest.version_files[ROLE_SHARED]
        shared = artifacts.stacks_from_tensors(
            self._read(shared_path, artifacts.KIND_SHARED),
            ROLE_SHARED,
            self.site_dims,
            self.config.shared_dim,
            shared_path,
        )
        shared = [stack.to(self.device) for stack in shared]
        bank, start = SetaBank.start(shared, self.config.expert_dim), 0
        if previous is not None:
            old_manifest, old_tasks = previous
            if isinstance(old_tasks.bank, SetaBank) and manifest.tasks[: len(old_manifest.tasks)] == old_manifest.tasks:
                bank, start = old_tasks.bank.with_shared(shared), len(old_manifest.tasks)
        for task in manifest.tasks[start:]:
            path = task.files[ROLE_EXPERTS]
            unique, gates = artifacts.seta_task_from_tensors(
                self._read(path, artifacts.KIND_TASK_SETA), self.config, self.site_dims, path
            )
            bank = bank.append([u.to(self.device) for u in unique], [g.to(self.device) for g in gates])
        if bank.num_tasks == 0:
            raise ValueError(f"version {manifest.version} has no trained task")
        return bank

    def network(self, loaded: LoadedTasks) -> ServedNetwork:
        """The network that serves a loaded version: a `CareModel`, `MoramModel` or `SetaModel`, as its bank."""
        if isinstance(loaded.bank, AtomBank):
            return MoramModel(self.config, self.backbone, loaded.bank, loaded.classifier, loaded.head)
        if isinstance(loaded.bank, SetaBank):
            return SetaModel(self.config, self.backbone, loaded.bank, loaded.classifier, loaded.head)
        return CareModel(self.config, self.backbone, loaded.bank, loaded.classifier, loaded.head)

    def routers(self, manifest: Manifest, cache: RouterCache) -> CachedRouters | None:
        """The version's routers through the cache; None under MoRAM and SETA (they have none)."""
        if self.config.method != "care":
            return None
        return CachedRouters(self.registry, manifest, self.site_dims, cache)

    def load_statistics(self, manifest: Manifest) -> tuple[ClassStatistics | None, HeadStatistics | None]:
        """The trainer's statistics as of `manifest` (trainer only): the cosine head's or the analytic head's.

        The analytic head's are those of the trained tasks alone, never of provisional ones.
        """
        version = head_state_version(manifest)
        state = self.registry.load_trainer_state(version)
        if state is None:
            raise ValueError(f"version {version} has no trainer state; it cannot be continued by a trainer")
        if self.config.head == "analytic":
            return None, HeadStatistics.from_tensors(artifacts.trainer_state_from_tensors(state.tensors, "head"))
        return ClassStatistics.from_tensors(artifacts.trainer_state_from_tensors(state.tensors)), None

    def load_served_statistics(self, manifest: Manifest) -> HeadStatistics:
        """What `manifest`'s served analytic head was solved from: trained classes, then provisional ones."""
        if not provisional_tasks(manifest):
            head_statistics = self.load_statistics(manifest)[1]
            if head_statistics is None:
                raise ValueError(f"version {manifest.version} has no analytic head statistics")
            return head_statistics
        state = self.registry.load_trainer_state(manifest.version)
        if state is None:
            raise ValueError(f"version {manifest.version} lists provisional tasks but has no trainer state")
        return HeadStatistics.from_tensors(artifacts.trainer_state_from_tensors(state.tensors, STATE_PROVISIONAL))

    def load_lineage(
        self,
        manifest: Manifest | None,
        cache: RouterCache,
        previous: tuple[Manifest, LoadedTasks] | None = None,
    ) -> Lineage:
        """What the trainer needs to learn the task after `manifest` (None: before the first task)."""
        if manifest is None:
            return Lineage.empty(self.backbone.feature_dim).to(self.device)
        loaded = self.load_tasks(manifest, previous)
        statistics, head_statistics = self.load_statistics(manifest)
        if not isinstance(loaded.bank, ExpertBank):
            raise ValueError(f"version {manifest.version} is not a CaRE version; continue it with load_moram_lineage")
        return Lineage(
            bank=loaded.bank,
            routers=CachedRouters(self.registry, manifest, self.site_dims, cache),
            classifier=loaded.classifier,
            statistics=statistics,
            head_statistics=head_statistics,
            head=loaded.head,
        )

    def load_moram_lineage(
        self, manifest: Manifest | None, previous: tuple[Manifest, LoadedTasks] | None = None
    ) -> MoramLineage:
        """What `learn_moram_task` needs to learn the task after `manifest` (None: before the first task)."""
        if manifest is None:
            empty = MoramLineage.empty(self.backbone.feature_dim)
            return MoramLineage(None, empty.classifier.to(self.device))
        loaded = self.load_tasks(manifest, previous)
        if not isinstance(loaded.bank, AtomBank):
            raise ValueError(f"version {manifest.version} is not a MoRAM version")
        return MoramLineage(loaded.bank, loaded.classifier, self.load_statistics(manifest)[1], loaded.head)

    def load_seta_lineage(
        self, manifest: Manifest | None, previous: tuple[Manifest, LoadedTasks] | None = None
    ) -> SetaLineage:
        """What `learn_seta_task` needs to learn the task after `manifest` (None: before the first task): the
        version's bank and head, and the anchor's importance from its trainer state."""
        if manifest is None:
            empty = SetaLineage.empty(self.backbone.feature_dim)
            return SetaLineage(None, empty.classifier.to(self.device))
        loaded = self.load_tasks(manifest, previous)
        if not isinstance(loaded.bank, SetaBank):
            raise ValueError(f"version {manifest.version} is not a SETA version")
        version = head_state_version(manifest)  # a provisional version keeps the trained one's state
        state = self.registry.load_trainer_state(version)
        if state is None:
            raise ValueError(f"version {version} has no trainer state; it cannot be continued by a trainer")
        importance = artifacts.stacks_from_tensors(
            state.tensors,
            "",
            self.site_dims,
            self.config.shared_dim,
            f"trainer state {version}",
            prefix=artifacts.SETA_IMPORTANCE,
        )
        return SetaLineage(
            loaded.bank,
            loaded.classifier,
            self.load_statistics(manifest)[1],
            loaded.head,
            [stack.to(self.device) for stack in importance],
        )


def iter_labels(manifest: Manifest) -> Iterator[tuple[str, str]]:
    """(label, task_id) of every class of a version, in head order: trained tasks, then provisional ones."""
    for task in manifest.tasks:
        for label in task.classes:
            yield label, task.task_id
    for provisional in provisional_tasks(manifest):
        for label in provisional.classes:
            yield label, provisional.task_id
