"""ModelStore and the served snapshot on real registry files: publishing refusals, incremental loads, provisional
versions, the served model's top-k, and the hot swap's refusals (tiny `test_vit`, random task weights, tmp_path).

tests/integration/test_registry_serving.py and test_analytic_head_registry.py cover predictions across versions,
corrupted files and trained heads; this covers what they do not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.backbone import SiteBackbone, build_backbone
from model.bank import ExpertBank
from model.config import ModelConfig
from model.head import AnalyticHead, HeadStatistics
from model.synthetic import random_shared, random_task, synthetic_head
from model.trainer import LearnedTask
from registry import Manifest, Registry
from service.inference.snapshot import ServedVersion, ServingSlot, SnapshotLoader, empty_version
from service.modelstore import (
    EXTRA_HEAD_STATE,
    EXTRA_PROVISIONAL,
    ModelStore,
    NewTask,
    ProvisionalHead,
    ProvisionalTask,
    head_state_version,
    iter_labels,
    provisional_tasks,
)
from service.routers.source import new_router_cache

CPU = torch.device("cpu")
CONFIG = ModelConfig(backbone="test_vit", image_size=32)


@pytest.fixture(scope="module")
def backbone() -> SiteBackbone:
    torch.manual_seed(0)
    return build_backbone(CONFIG, "random")


@pytest.fixture
def store(tmp_path: Path, backbone: SiteBackbone) -> ModelStore:
    return ModelStore(Registry.from_path(tmp_path / "registry"), CONFIG, backbone, CPU)


def head_dim(store: ModelStore) -> int:
    return store.backbone.feature_dim + sum(store.backbone.site_dims)


def statistics(store: ModelStore, classes: int, seed: int) -> HeadStatistics:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(3 * classes, head_dim(store), generator=generator)
    return HeadStatistics.empty(head_dim(store)).add(inputs, torch.arange(classes).repeat(3), classes)


def learned(store: ModelStore, index: int, classes: int, total: int, seed: int) -> LearnedTask:
    """A task with random weights, carrying what publishing reads: classifier, head and statistics over `total`."""
    generator = torch.Generator().manual_seed(seed)
    sites = store.backbone.site_dims
    task = random_task(CONFIG, sites, index, classes, generator)
    shared = random_shared(CONFIG, sites, generator) if index == 0 else None
    classifier = torch.randn(total, store.backbone.feature_dim, generator=generator)
    head = synthetic_head(CONFIG, classifier, sites)
    return LearnedTask(index, task, shared, classifier, None, head=head, head_statistics=statistics(store, total, seed))


def publish(store: ModelStore, parent: Manifest | None, classes: int = 2, seed: int = 0) -> Manifest:
    index = 0 if parent is None else len(parent.tasks)
    total = classes + (0 if parent is None else sum(len(t.classes) for t in parent.tasks))
    labels = [f"l{index}-{k}" for k in range(classes)]
    return store.publish(parent, [NewTask(learned(store, index, classes, total, seed), f"t-{index}", labels)])


def provisional_head(store: ModelStore, parent: Manifest, classes: list[str], seed: int) -> ProvisionalHead:
    total = sum(len(t.classes) for t in parent.tasks) + len(classes)
    generator = torch.Generator().manual_seed(seed)
    head = synthetic_head(CONFIG, torch.randn(total, store.backbone.feature_dim, generator=generator), [])
    assert head is not None
    full = AnalyticHead(
        torch.ones(head_dim(store)),
        torch.cat([head.weight, torch.zeros(sum(store.backbone.site_dims), total)]),
        head.bias,
        head.temperature,
    )
    task = ProvisionalTask("t-queued", "queued", tuple(classes))
    return ProvisionalHead([task], full, statistics(store, total, seed + 100))


def bank_tensors(bank: ExpertBank) -> dict[str, torch.Tensor]:
    """Every raw tensor of a bank, by site, part and field."""
    tensors = {}
    for site, site_bank in enumerate(bank.sites):
        for part in ("experts", "perceptrons", "shared"):
            stack = getattr(site_bank, part)
            for item in dataclasses.fields(stack):
                value = getattr(stack, item.name)
                if isinstance(value, torch.Tensor):
                    tensors[f"{site}.{part}.{item.name}"] = value
    return tensors


@pytest.fixture
def reads(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The registry files read as tensors, in order (the registry is real; the list only watches it)."""
    seen: list[str] = []
    real = store.registry.load_tensors

    def load_tensors(relpath: str) -> dict[str, torch.Tensor]:
        seen.append(relpath)
        return real(relpath)

    monkeypatch.setattr(store.registry, "load_tensors", load_tensors)
    yield seen


# ---- publishing -----------------------------------------------------------------------------------------------


def test_publish_refuses_nothing_a_task_out_of_order_and_a_first_version_without_the_shared_expert(
    store: ModelStore,
) -> None:
    with pytest.raises(ValueError, match="nothing to publish"):
        store.publish(None, [])
    without_shared = dataclasses.replace(learned(store, 0, 2, 2, 0), shared=None)
    with pytest.raises(ValueError, match="shared expert"):
        store.publish(None, [NewTask(without_shared, "t-x", ["a", "b"])])
    assert store.registry.current_version() is None  # nothing was published by the refusals
    first = publish(store, None)
    with pytest.raises(ValueError, match="learned as task 0, but it would be task 1"):
        store.publish(first, [NewTask(learned(store, 0, 2, 4, 0), "t-x", ["a", "b"])])
    assert store.registry.current_version() == 1


def test_a_version_reads_back_as_published(store: ModelStore) -> None:
    first = publish(store, None, classes=2, seed=1)
    task = learned(store, 1, 3, 5, seed=2)
    second = store.publish(first, [NewTask(task, "t-1", ["x", "y", "z"], name="second")])
    assert (second.version, [t.task_id for t in second.tasks]) == (2, ["t-0", "t-1"])
    assert second.tasks[1].name == "second" and second.version_files["shared"] == first.version_files["shared"]
    loaded = store.load_tasks(second)
    assert loaded.bank.num_tasks == 2
    assert torch.equal(loaded.classifier, task.classifier)
    assert loaded.head is not None and task.head is not None
    assert torch.equal(loaded.head.weight, task.head.weight) and loaded.head.temperature == task.head.temperature
    trained, head_statistics = store.load_statistics(second)
    assert trained is None and head_statistics is not None and task.head_statistics is not None
    assert torch.equal(head_statistics.gram, task.head_statistics.gram)
    assert list(iter_labels(second)) == [("l0-0", "t-0"), ("l0-1", "t-0"), ("x", "t-1"), ("y", "t-1"), ("z", "t-1")]


def test_a_version_of_another_configuration_is_refused(store: ModelStore, backbone: SiteBackbone) -> None:
    manifest = publish(store, None)
    other = ModelStore(store.registry, dataclasses.replace(CONFIG, expert_dim=8), backbone, CPU)
    with pytest.raises(Exception, match="expert_dim|fingerprint|configuration"):
        other.check(manifest)
    with pytest.raises(Exception, match="expert_dim|fingerprint|configuration"):
        other.load_tasks(manifest)


# ---- incremental loads ----------------------------------------------------------------------------------------


def test_loading_the_next_version_reads_only_its_new_files_and_equals_a_full_load(
    store: ModelStore, reads: list[str]
) -> None:
    first = publish(store, None, seed=1)
    second = publish(store, first, seed=2)
    previous = store.load_tasks(first)
    reads.clear()
    incremental = store.load_tasks(second, (first, previous))
    assert sorted(reads) == sorted([second.version_files["classifier"], second.tasks[1].files["experts"]])
    reads.clear()
    full = store.load_tasks(second)
    assert second.tasks[0].files["experts"] in reads and second.version_files["shared"] in reads
    assert incremental.bank.num_tasks == full.bank.num_tasks == 2
    full_tensors, incremental_tensors = bank_tensors(full.bank), bank_tensors(incremental.bank)
    assert len(full_tensors) == len(incremental_tensors) > 0
    for name, tensor in full_tensors.items():
        assert torch.equal(incremental_tensors[name], tensor), name


def test_a_previous_version_of_another_lineage_is_not_reused(
    store: ModelStore, backbone: SiteBackbone, tmp_path: Path, reads: list[str]
) -> None:
    other = ModelStore(Registry.from_path(tmp_path / "other"), CONFIG, backbone, CPU)
    other_first = other.publish(None, [NewTask(learned(other, 0, 2, 2, 9), "t-other", ["o1", "o2"])])
    first = publish(store, None, seed=1)
    second = publish(store, first, seed=2)
    reads.clear()
    store.load_tasks(second, (other_first, other.load_tasks(other_first)))
    # Its first task is another one: nothing of it may be reused, everything of this version is read.
    assert second.tasks[0].files["experts"] in reads and second.version_files["shared"] in reads


# ---- provisional versions -------------------------------------------------------------------------------------


def test_a_provisional_version_lists_its_tasks_after_the_trained_ones_and_keeps_both_statistics(
    store: ModelStore,
) -> None:
    first = publish(store, None, classes=2, seed=1)
    provisional = provisional_head(store, first, ["q1", "q2", "q3"], seed=5)
    loaded_first = store.load_tasks(first)
    version = store.publish_provisional(first, loaded_first.classifier, provisional)
    assert version.version == 2 and version.tasks == first.tasks
    assert version.extra[EXTRA_HEAD_STATE] == 1 and head_state_version(version) == 1
    assert provisional_tasks(version) == [ProvisionalTask("t-queued", "queued", ("q1", "q2", "q3"))]
    assert [label for label, _ in iter_labels(version)] == ["l0-0", "l0-1", "q1", "q2", "q3"]
    # The trainer continues from the trained statistics (version 1's), the provisional lane from the served ones.
    _, trained = store.load_statistics(version)
    _, first_trained = store.load_statistics(first)
    assert trained is not None and first_trained is not None and torch.equal(trained.gram, first_trained.gram)
    served = store.load_served_statistics(version)
    assert served.num_classes == 5 and torch.equal(served.gram, provisional.statistics.gram)
    loaded = store.load_tasks(version)
    assert loaded.head is not None and loaded.head.num_classes == 5 and loaded.bank.num_tasks == 1
    # Training the queued task replaces the provisional one: a normal publish carries no provisional tasks over.
    trained_version = publish(store, version, classes=3, seed=6)
    assert provisional_tasks(trained_version) == [] and EXTRA_PROVISIONAL not in trained_version.extra
    assert head_state_version(trained_version) == trained_version.version


def test_malformed_provisional_entries_and_head_state_versions_are_refused(store: ModelStore) -> None:
    manifest = publish(store, None)
    assert provisional_tasks(None) == [] and provisional_tasks(manifest) == []
    for bad in ("not a list", [{"task_id": "t", "classes": "a,b"}], ["t-1"]):
        with pytest.raises(ValueError, match="provisional"):
            provisional_tasks(manifest.model_copy(update={"extra": {EXTRA_PROVISIONAL: bad}}))
    for bad_version in (0, 2, "1", None):
        with pytest.raises(ValueError, match=EXTRA_HEAD_STATE):
            head_state_version(manifest.model_copy(update={"extra": {EXTRA_HEAD_STATE: bad_version}}))


# ---- the served version ---------------------------------------------------------------------------------------


def test_nothing_learned_serves_no_probabilities() -> None:
    empty = empty_version()
    assert (empty.version, empty.num_tasks, empty.num_classes, empty.num_provisional_classes) == (None, 0, 0, 0)
    with pytest.raises(RuntimeError, match="no classes"):
        empty.probabilities(torch.zeros(1, 3, 32, 32))


def test_the_top_k_is_ordered_clamped_and_marks_provisional_classes(store: ModelStore) -> None:
    first = publish(store, None, classes=2, seed=1)
    provisional = provisional_head(store, first, ["q1", "q2"], seed=5)
    version = store.publish_provisional(first, store.load_tasks(first).classifier, provisional)
    served = SnapshotLoader(store, new_router_cache(CPU, None)).load(version, None)
    assert (served.num_tasks, served.num_classes, served.num_provisional_classes) == (1, 4, 2)
    assert served.served_task_ids == {"t-0", "t-queued"}
    probabilities = served.probabilities(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert probabilities.shape == (3, 4)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))
    rows = served.top(probabilities, top_k=10)  # more than there are classes: every class, once
    for row, expected in zip(rows, probabilities.tolist(), strict=True):
        assert sorted(p.label for p in row) == ["l0-0", "l0-1", "q1", "q2"]
        assert [p.score for p in row] == sorted(expected, reverse=True)
        for prediction in row:
            assert prediction.score == pytest.approx(expected[served.labels.index(prediction.label)])
            assert prediction.provisional == prediction.label.startswith("q")
            assert prediction.task_id == ("t-queued" if prediction.provisional else "t-0")
    assert [len(row) for row in served.top(probabilities, top_k=1)] == [1, 1, 1]


# ---- the hot swap ---------------------------------------------------------------------------------------------


def test_the_swap_takes_only_newer_versions_refuses_a_bad_one_once_and_reuses_loaded_tasks(
    store: ModelStore, reads: list[str]
) -> None:
    swaps: list[ServedVersion] = []
    failures: list[int] = []
    serving = ServingSlot(
        SnapshotLoader(store, new_router_cache(CPU, None)),
        on_swap=swaps.append,
        on_failure=lambda version, error: failures.append(version),
    )
    assert not serving.update_to(None) and not serving.update_to(1)  # nothing published: version 1 is refused
    assert failures == [1] and serving.served.version is None
    first = publish(store, None, seed=1)
    assert not serving.update_to(1), "a refused version is not tried again"
    assert failures == [1]
    second = publish(store, first, seed=2)
    reads.clear()
    assert serving.update_to(2) and serving.served.version == 2 and [s.version for s in swaps] == [2]
    assert second.tasks[0].files["experts"] in reads  # nothing was loaded before: a full load
    assert not serving.update_to(2) and not serving.update_to(1)  # not newer
    third = publish(store, second, seed=3)
    reads.clear()
    assert serving.update_to(3) and serving.served.version == 3
    # Only what version 3 adds was read; the tasks already served were reused.
    assert sorted(reads) == sorted([third.version_files["classifier"], third.tasks[2].files["experts"]])
    assert [s.version for s in swaps] == [2, 3] and swaps[-1] is serving.served
