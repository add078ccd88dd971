"""MoRAM (model/moram.py): shapes, its fast and bounded forms against a loop over atoms, learning on real images,
the registry round trip of a task's atoms, and the method switch's refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bench.datasets import digits_split
from model import artifacts
from model.backbone import SiteBackbone, build_backbone, make_transform
from model.classifier import cosine_logits
from model.config import ModelConfig, TrainConfig
from model.moram import (
    AtomBank,
    AtomStack,
    MoramLineage,
    MoramModel,
    MoramOptions,
    MoramTask,
    advance_moram,
    learn_moram_task,
    moram_bounded,
    moram_faithful,
    moram_reference,
)
from registry import IncompatibleArtifact, Registry, TaskRecord, check_compatible, task_file_path, version_file_path

MORAM = ModelConfig(backbone="test_vit", image_size=32, method="moram", moram_rank=4, moram_top_k=3)
QUICK = TrainConfig(epochs=2, batch_size=8, min_steps=0)


@pytest.fixture(scope="module")
def backbone() -> SiteBackbone:
    torch.manual_seed(0)
    return build_backbone(MORAM, "random")


def random_atoms(count: int, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> AtomStack:
    generator = torch.Generator().manual_seed(seed)
    return AtomStack(
        torch.randn(count, dim, generator=generator, dtype=dtype),
        torch.randn(count, dim, generator=generator, dtype=dtype),
    )


def random_inputs(batch: int, tokens: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, tokens, dim, generator=generator, dtype=torch.float64),
        torch.randn(batch, dim, generator=generator, dtype=torch.float64),
    )


def random_bank(config: ModelConfig, backbone: SiteBackbone, tasks: int, seed: int) -> AtomBank:
    rank = config.moram_rank
    per_task = [
        [random_atoms(rank, dim, seed + 100 * t + s, torch.float32) for s, dim in enumerate(backbone.site_dims)]
        for t in range(tasks)
    ]
    return AtomBank.of_tasks(per_task, rank)


def quick_task(backbone: SiteBackbone, lineage: MoramLineage, classes: int, seed: int) -> MoramTask:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4 * classes, 3, 32, 32, generator=generator)
    labels = torch.arange(classes).repeat(4)
    return learn_moram_task(backbone, MORAM, QUICK, lineage, images, labels, classes)


# ---- the method switch --------------------------------------------------------------------------------------------


def test_care_stays_the_default_and_keeps_its_recorded_form() -> None:
    care = ModelConfig()
    assert care.method == "care"
    recorded = care.to_dict()
    assert "method" not in recorded and not any(key.startswith("moram_") for key in recorded)
    # A configuration recorded before the switch existed (no `method`) reads back as CaRE, with the same fingerprint.
    read_back = ModelConfig.from_dict(recorded)
    assert read_back == care and read_back.fingerprint() == care.fingerprint()
    moram = dataclasses.replace(care, method="moram")
    assert moram.to_dict()["method"] == "moram" and moram.fingerprint() != care.fingerprint()
    assert ModelConfig.from_dict(moram.to_dict()) == moram


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"method": "seta", "head": "cosine"}, "analytic head only"),
        ({"method": "seta", "moram_rank": 8}, "apply only with method='moram'"),
        ({"method": "moram", "seta_top_k": 3}, "apply only with method='seta'"),
        ({"method": "seta", "seta_gate_scale": 0.0}, "seta_gate_scale > 0"),
        ({"method": "lora"}, "must be one of"),
        ({"moram_rank": 8}, "apply only with method='moram'"),
        ({"method": "moram", "head": "cosine"}, "analytic head only"),
        ({"method": "moram", "moram_temperature": 0.0}, "moram_temperature > 0"),
        ({"method": "moram", "moram_candidates": -1}, "moram_candidates"),
    ],
)
def test_bad_method_settings_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**values)  # type: ignore[arg-type]


def test_an_artifact_of_another_method_is_refused(backbone: SiteBackbone) -> None:
    care = dataclasses.replace(MORAM, method="care", moram_rank=16, moram_top_k=16)
    meta = artifacts.metadata(MORAM, artifacts.KIND_TASK_ATOMS, backbone.site_dims)
    artifacts.check_metadata(meta, MORAM, artifacts.KIND_TASK_ATOMS, "atoms")
    with pytest.raises(artifacts.IncompatibleArtifactError, match="method='moram' \\(running: 'care'\\)"):
        artifacts.check_metadata(meta, care, artifacts.KIND_TASK_ATOMS, "atoms")
    care_meta = artifacts.metadata(care, artifacts.KIND_TASK_EXPERTS, backbone.site_dims)
    with pytest.raises(artifacts.IncompatibleArtifactError, match="another model configuration"):
        artifacts.check_metadata(care_meta, MORAM, artifacts.KIND_TASK_EXPERTS, "experts")


# ---- shapes and exactness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("evaluate", [True, False])
def test_the_fast_form_is_the_loop_over_atoms(threshold: float, evaluate: bool) -> None:
    atoms = random_atoms(24, 8, seed=1)
    tokens, routing = random_inputs(3, 5, 8, seed=2)
    options = MoramOptions(top_k=4, temperature=0.05, threshold=threshold, evaluate=evaluate)
    fast = moram_faithful(tokens, atoms, options)
    assert fast.shape == tokens.shape
    torch.testing.assert_close(fast, moram_reference(tokens, routing, atoms, options), rtol=1e-10, atol=1e-10)


def test_the_threshold_applies_at_evaluation_only_and_is_not_renormalised() -> None:
    atoms = random_atoms(24, 8, seed=3)
    tokens, _ = random_inputs(2, 4, 8, seed=4)
    loose = MoramOptions(top_k=4, temperature=0.05, threshold=0.0)
    assert torch.equal(
        moram_faithful(tokens, atoms, dataclasses.replace(loose, threshold=5.0, evaluate=False)),
        moram_faithful(tokens, atoms, loose),
    )
    # No normalised score can reach 1.01: everything is cut, nothing is renormalised back.
    assert torch.count_nonzero(moram_faithful(tokens, atoms, dataclasses.replace(loose, threshold=1.01))) == 0


def test_the_bounded_form_is_its_loop_over_atoms_and_the_faithful_form_where_they_should_agree() -> None:
    atoms = random_atoms(40, 8, seed=5)
    gram = atoms.keys.T @ atoms.keys
    tokens, routing = random_inputs(3, 6, 8, seed=6)
    faithful = MoramOptions(top_k=3, temperature=0.05, threshold=0.2)
    bounded = dataclasses.replace(faithful, candidates=12)
    fast = moram_bounded(tokens, routing, atoms, bounded, gram)
    torch.testing.assert_close(fast, moram_reference(tokens, routing, atoms, bounded), rtol=1e-10, atol=1e-10)
    # With room for every atom the bound changes nothing.
    roomy = dataclasses.replace(faithful, candidates=40)
    assert torch.equal(moram_bounded(tokens, routing, atoms, roomy, gram), moram_faithful(tokens, atoms, faithful))
    # A token that is its sample's routing vector finds its top-k among the candidates: the bound is then exact,
    # normalisation over every atom included (through the Gram matrix).
    own = routing[:, None, :]
    torch.testing.assert_close(
        moram_bounded(own, routing, atoms, bounded, gram), moram_faithful(own, atoms, faithful), rtol=1e-10, atol=1e-10
    )
    # Other tokens may lose atoms outside their sample's candidates: the bound is an approximation there.
    assert not torch.allclose(fast, moram_faithful(tokens, atoms, faithful))


@pytest.mark.parametrize("candidates", [0, 6])
def test_a_model_serves_every_class_and_its_fast_path_is_its_reference(backbone: SiteBackbone, candidates: int) -> None:
    config = dataclasses.replace(MORAM, moram_candidates=candidates)
    bank = random_bank(config, backbone, tasks=3, seed=7)
    assert (bank.num_tasks, bank.num_atoms) == (3, 12)
    classifier = torch.randn(7, backbone.feature_dim, generator=torch.Generator().manual_seed(8))
    model = MoramModel(config, backbone, bank, classifier)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    logits = model.logits(images)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, model.logits(images, path="reference"), rtol=1e-4, atol=1e-4)
    probabilities = model.predict_proba(images)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))
    # The atoms change the features: a model without their values is the plain backbone.
    zero = AtomBank([dataclasses.replace(s.atoms, values=torch.zeros_like(s.atoms.values)) for s in bank.sites], 4)
    plain = MoramModel(config, backbone, zero, classifier).head_inputs_from_embedding(backbone.embed(images))
    torch.testing.assert_close(plain, backbone.forward_plain(images))
    assert not torch.allclose(model.head_inputs_from_embedding(backbone.embed(images)), plain)
    # The head stays in float32 under the GPU path's bf16 autocast (CPU autocast here), as CaRE's does.
    inputs = model.head_inputs_from_embedding(backbone.embed(images))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.scores(inputs).dtype == model.probabilities(inputs).dtype == torch.float32
        torch.testing.assert_close(model.scores(inputs), model.scores(inputs.float()))


def test_a_bank_refuses_ragged_sites_and_partial_tasks(backbone: SiteBackbone) -> None:
    dim = backbone.site_dims[0]
    with pytest.raises(ValueError, match="disagree"):
        AtomBank([random_atoms(4, dim, 0), random_atoms(8, dim, 1)], 4)
    with pytest.raises(ValueError, match="whole number of tasks"):
        AtomBank([random_atoms(6, dim, 0)], 4)
    with pytest.raises(ValueError, match="method 'moram'"):
        MoramModel(ModelConfig(backbone="test_vit"), backbone, random_bank(MORAM, backbone, 1, 0), torch.zeros(1, 1))


# ---- learning -----------------------------------------------------------------------------------------------------


def test_learning_trains_only_the_new_atoms_and_is_deterministic(backbone: SiteBackbone) -> None:
    first = quick_task(backbone, MoramLineage.empty(backbone.feature_dim), classes=2, seed=1)
    assert first.index == 0 and len(first.atoms) == backbone.num_sites
    assert all(a.keys.shape == (MORAM.moram_rank, d) for a, d in zip(first.atoms, backbone.site_dims, strict=True))
    assert any(torch.count_nonzero(a.values) for a in first.atoms)  # values start at 0 and have learned
    lineage = advance_moram(MoramLineage.empty(backbone.feature_dim), first, MORAM.moram_rank)
    frozen = [s.atoms.keys.clone() for s in lineage.bank.sites]  # type: ignore[union-attr]
    second = quick_task(backbone, lineage, classes=3, seed=2)
    again = quick_task(backbone, lineage, classes=3, seed=2)
    assert all(torch.equal(a.values, b.values) for a, b in zip(second.atoms, again.atoms, strict=True))
    assert all(torch.equal(f, s.atoms.keys) for f, s in zip(frozen, lineage.bank.sites, strict=True))  # type: ignore[union-attr]
    assert second.index == 1 and second.classifier.shape == (5, backbone.feature_dim)
    assert second.head is not None and second.head.num_classes == 5


@pytest.mark.slow
def test_two_tasks_of_digits_are_both_learned() -> None:
    """Two tasks of real images (scikit-learn's digits) on the bundled ImageNet CNN: the training loss falls in
    each task and, served without a task id, both tasks are classified far above chance."""
    pytest.importorskip("sklearn.datasets")
    config = ModelConfig(image_size=64, method="moram", moram_rank=8, moram_top_k=8)
    backbone = build_backbone(config, "bundled")
    transform = make_transform(backbone, 64)
    images, targets, train_rows, test_rows = digits_split(transform)
    tasks = [(0, 1), (2, 3)]
    lineage = MoramLineage.empty(backbone.feature_dim)
    train = TrainConfig(epochs=4, batch_size=16, min_steps=0)
    for classes in tasks:
        rows = torch.cat([train_rows[targets[train_rows] == c][:40] for c in classes])
        labels = torch.tensor([classes.index(int(t)) for t in targets[rows]])
        learned = learn_moram_task(backbone, config, train, lineage, images[rows], labels, len(classes))
        assert learned.metrics["final_loss"] < learned.metrics["first_loss"], learned.metrics
        # The atoms carry part of it: the task's CE on its images is lower with them than with their values zeroed.
        offset = len(lineage.classifier)
        lineage = advance_moram(lineage, learned, config.moram_rank)
        assert lineage.bank is not None
        zeroed = [AtomStack(s.atoms.keys, torch.zeros_like(s.atoms.values)) for s in lineage.bank.sites]
        losses = []
        for bank in (lineage.bank, AtomBank(zeroed, config.moram_rank)):
            features = MoramModel(config, backbone, bank, lineage.classifier).head_inputs_from_embedding(
                backbone.embed(images[rows])
            )
            logits = config.cosine_scale * cosine_logits(features, lineage.classifier)
            losses.append(float(torch.nn.functional.cross_entropy(logits, labels + offset)))
        assert losses[0] < losses[1], f"task {classes}: CE {losses[0]:.3f} with its atoms, {losses[1]:.3f} without"
    assert lineage.bank is not None
    model = MoramModel(config, backbone, lineage.bank, lineage.classifier, lineage.head)
    seen = [c for classes in tasks for c in classes]
    for classes in tasks:
        rows = torch.cat([test_rows[targets[test_rows] == c] for c in classes])
        truth = torch.tensor([seen.index(int(t)) for t in targets[rows]])
        accuracy = float((model.logits(images[rows]).argmax(1) == truth).float().mean())
        assert accuracy > 0.7, f"task {classes}: accuracy {accuracy:.2f} over {len(seen)} classes (chance 0.25)"


# ---- the registry -------------------------------------------------------------------------------------------------


def publish_task(registry: Registry, backbone: SiteBackbone, task: MoramTask, parent: int | None) -> None:
    index = task.index
    atoms_path = task_file_path(index, f"t-{index}", "atoms")
    classifier_path = version_file_path(index + 1, "classifier")
    meta = artifacts.metadata(MORAM, artifacts.KIND_TASK_ATOMS, backbone.site_dims, task_index=index)
    classes = int(task.classifier.shape[0])
    previous = [] if parent is None else list(registry.load_manifest(parent).tasks)
    registry.publish(
        parent=parent,
        backbone=MORAM.backbone,
        model_config=MORAM.to_dict(),
        tasks=[*previous, TaskRecord(task_id=f"t-{index}", classes=("a", "b"), files={"atoms": atoms_path})],
        new_files={
            atoms_path: (artifacts.task_atom_tensors(task.atoms), meta),
            classifier_path: (
                artifacts.classifier_tensors(task.classifier, task.head),
                artifacts.metadata(MORAM, artifacts.KIND_CLASSIFIER, backbone.site_dims, num_classes=classes),
            ),
        },
        version_files={"classifier": classifier_path},
    )


def test_moram_tasks_round_trip_through_the_registry(tmp_path: Path, backbone: SiteBackbone) -> None:
    registry = Registry.from_path(tmp_path / "registry")
    lineage = MoramLineage.empty(backbone.feature_dim)
    for index in range(2):
        task = quick_task(backbone, lineage, classes=2, seed=index)
        publish_task(registry, backbone, task, None if index == 0 else index)
        lineage = advance_moram(lineage, task, MORAM.moram_rank)
    manifest = registry.load_manifest(2)
    check_compatible(manifest, backbone=MORAM.backbone, model_config=MORAM.to_dict())
    registry.verify(manifest)
    loaded = []
    for record in manifest.tasks:
        path = record.files["atoms"]
        artifacts.check_metadata(registry.read_metadata(path), MORAM, artifacts.KIND_TASK_ATOMS, path)
        loaded.append(artifacts.atoms_from_tensors(registry.load_tensors(path), MORAM, backbone.site_dims, path))
    classifier_path = manifest.version_files["classifier"]
    tensors = registry.load_tensors(classifier_path)
    classifier = artifacts.classifier_from_tensors(tensors, 4, backbone.feature_dim, classifier_path)
    head = artifacts.head_from_tensors(tensors, MORAM, 4, classifier_path)
    served = MoramModel(MORAM, backbone, AtomBank.of_tasks(loaded, MORAM.moram_rank), classifier, head)
    assert lineage.bank is not None
    trained = MoramModel(MORAM, backbone, lineage.bank, lineage.classifier, lineage.head)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for got, want in zip(served.bank.sites, lineage.bank.sites, strict=True):
        assert torch.equal(got.atoms.keys, want.atoms.keys) and torch.equal(got.atoms.values, want.atoms.values)
    assert head is not None and lineage.head is not None and torch.equal(head.weight, lineage.head.weight)
    # Equal tensors; only their memory layout may differ (the file stores them contiguous), hence the tolerance.
    torch.testing.assert_close(served.logits(images), trained.logits(images), rtol=1e-5, atol=1e-4)

    # A process of another method (or another MoRAM setting) is refused, naming the difference.
    care = dataclasses.replace(MORAM, method="care", moram_rank=16, moram_top_k=16)
    with pytest.raises(IncompatibleArtifact, match='method: registry has "moram", this process has null'):
        check_compatible(manifest, backbone=care.backbone, model_config=care.to_dict())
    bounded = dataclasses.replace(MORAM, moram_candidates=8)
    with pytest.raises(IncompatibleArtifact, match="moram_candidates"):
        check_compatible(manifest, backbone=bounded.backbone, model_config=bounded.to_dict())
    recorded = registry.read_metadata(manifest.tasks[0].files["atoms"])["care.model_config"]
    assert json.loads(recorded)["method"] == "moram"
