"""SETA versions through the service's model store: each version holds its own shared experts and anchor
importance (so a rollback is exact), hot-loads read only the new files, and other methods or settings are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model import artifacts
from model.backbone import SiteBackbone, build_backbone
from model.config import ModelConfig, TrainConfig
from model.seta import SetaBank, SetaLineage, SetaModel, SetaTask, advance_seta, learn_seta_task
from registry import IncompatibleArtifact, Registry
from service.modelstore import NO_ROUTERS, ModelStore, NewTask

SETA = ModelConfig(backbone="test_vit", image_size=32, method="seta")
QUICK = TrainConfig(epochs=2, batch_size=8, min_steps=0)


@pytest.fixture(scope="module")
def backbone() -> SiteBackbone:
    torch.manual_seed(0)
    return build_backbone(SETA, "random")


def quick_task(backbone: SiteBackbone, lineage: SetaLineage, seed: int) -> SetaTask:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    return learn_seta_task(backbone, SETA, QUICK, lineage, images, torch.arange(2).repeat(4), 2)


def test_seta_versions_round_trip_through_the_model_store(
    tmp_path: Path, backbone: SiteBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each version holds its own shared experts and anchor importance: loading version 1 after version 2 serves
    and continues exactly version 1 (rollback), and a hot-load of version 2 reads only its new files."""
    store = ModelStore(Registry.from_path(tmp_path / "registry"), SETA, backbone, torch.device("cpu"))
    parent, learned = None, []
    for index in range(2):
        lineage = store.load_seta_lineage(parent)
        assert lineage.num_tasks == index
        task = quick_task(backbone, lineage, seed=10 + index)
        learned.append(task)
        parent = store.publish(parent, [NewTask(task, f"t-{index}", [f"c{index}-0", f"c{index}-1"])])
    first, second = store.registry.load_manifest(1), parent
    assert second is not None and first.version_files["shared"] != second.version_files["shared"]
    assert [set(t.files) for t in second.tasks] == [{"experts"}, {"experts"}]

    loaded_first = store.load_tasks(first)
    rolled_back = store.load_seta_lineage(first)
    assert rolled_back.bank is not None and rolled_back.importance is not None
    for site, want, omega, want_omega in zip(
        rolled_back.bank.sites, learned[0].shared, rolled_back.importance, learned[0].importance, strict=True
    ):
        assert torch.equal(site.shared.down_weight, want.down_weight)
        assert torch.equal(omega.up_weight, want_omega.up_weight)

    reads: list[str] = []
    real = store.registry.load_tensors

    def recording(path: str) -> dict[str, torch.Tensor]:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(store.registry, "load_tensors", recording)
    incremental = store.load_tasks(second, (first, loaded_first))
    assert sorted(reads) == sorted(
        [second.version_files["classifier"], second.version_files["shared"], second.tasks[1].files["experts"]]
    )
    monkeypatch.setattr(store.registry, "load_tensors", real)
    full = store.load_tasks(second)
    assert isinstance(incremental.bank, SetaBank) and isinstance(full.bank, SetaBank)
    for got, expected, shared in zip(incremental.bank.sites, full.bank.sites, learned[1].shared, strict=True):
        assert torch.equal(got.unique.up_weight, expected.unique.up_weight) and torch.equal(got.gates, expected.gates)
        assert torch.equal(got.shared.up_weight, shared.up_weight)
    network = store.network(full)
    assert isinstance(network, SetaModel) and network.num_tasks == 2
    assert store.routers(second, None) is None  # type: ignore[arg-type]  # the gate is resident: nothing to cache
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    bank = advance_seta(store.load_seta_lineage(first), learned[1], SETA.expert_dim).bank
    assert bank is not None
    as_trained = SetaModel(SETA, backbone, bank, full.classifier, full.head)
    torch.testing.assert_close(
        network.predict_proba(images, NO_ROUTERS), as_trained.predict_proba(images), rtol=1e-5, atol=1e-5
    )

    # A store of another method or another SETA setting refuses the registry, naming the difference.
    care = ModelStore(store.registry, dataclasses.replace(SETA, method="care"), backbone, torch.device("cpu"))
    with pytest.raises(IncompatibleArtifact, match='method: registry has "seta"'):
        care.load_tasks(second)
    stiffer = ModelStore(store.registry, dataclasses.replace(SETA, seta_anchor=50.0), backbone, torch.device("cpu"))
    with pytest.raises(IncompatibleArtifact, match="seta_anchor"):
        stiffer.load_tasks(second)
    meta = store.registry.read_metadata(second.tasks[0].files["experts"])
    with pytest.raises(artifacts.IncompatibleArtifactError, match="task-seta"):
        artifacts.check_metadata(meta, SETA, artifacts.KIND_TASK_EXPERTS, "experts")
