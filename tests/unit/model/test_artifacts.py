"""Task artifacts: the documented key scheme survives a safetensors round trip; foreign artifacts are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import artifacts
from model.alignment import ClassStatistics
from model.backbone import SiteBackbone
from model.config import ModelConfig
from model.network import CareModel
from model.routers import ResidentRouters
from model.synthetic import random_shared, random_task


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=meta)


def test_round_trip_through_safetensors_gives_identical_predictions(
    tmp_path: Path, vit_config: ModelConfig, vit_backbone: SiteBackbone
) -> None:
    dims = vit_backbone.site_dims
    generator = torch.Generator().manual_seed(0)
    shared = random_shared(vit_config, dims, generator)
    tasks = [random_task(vit_config, dims, i, 2 + i, generator) for i in range(3)]
    _save(tmp_path / "shared.st", artifacts.shared_tensors(shared), artifacts.metadata(vit_config, "shared", dims))
    for i, task in enumerate(tasks):
        meta = artifacts.metadata(vit_config, artifacts.KIND_TASK_EXPERTS, dims, task_index=i, num_classes=2 + i)
        _save(tmp_path / f"e{i}.st", artifacts.task_expert_tensors(task), meta)
        meta = artifacts.metadata(vit_config, artifacts.KIND_TASK_ROUTERS, dims, task_index=i)
        _save(tmp_path / f"r{i}.st", artifacts.task_router_tensors(task), meta)

    for i in range(3):
        with safe_open(str(tmp_path / f"e{i}.st"), "pt") as handle:
            artifacts.check_metadata(handle.metadata(), vit_config, artifacts.KIND_TASK_EXPERTS, f"e{i}.st")
    loaded = [(load_file(str(tmp_path / f"e{i}.st")), 2 + i) for i in range(3)]
    bank = artifacts.stack_tasks(load_file(str(tmp_path / "shared.st")), loaded, vit_config, dims)
    routers = ResidentRouters(
        [artifacts.routers_from_tensors(load_file(str(tmp_path / f"r{i}.st")), i, dims, "r") for i in range(3)]
    )
    direct_bank = artifacts.stack_tasks(
        artifacts.shared_tensors(shared),
        [(artifacts.task_expert_tensors(t), 2 + i) for i, t in enumerate(tasks)],
        vit_config,
        dims,
    )
    direct_routers = ResidentRouters(
        [artifacts.routers_from_tensors(artifacts.task_router_tensors(t), i, dims, "r") for i, t in enumerate(tasks)]
    )
    classifier = torch.randn(9, vit_backbone.feature_dim, generator=generator)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    from_files = CareModel(vit_config, vit_backbone, bank, classifier).logits(images, routers)
    from_memory = CareModel(vit_config, vit_backbone, direct_bank, classifier).logits(images, direct_routers)
    # Tensors survive bit for bit; the logits may differ in the last ulp (memory-mapped tensors can take other
    # SIMD code paths), predictions not at all.
    for i, task in enumerate(tasks):
        for key, value in artifacts.task_expert_tensors(task).items():
            assert torch.equal(loaded[i][0][key], value), key
    torch.testing.assert_close(from_files, from_memory, rtol=1e-6, atol=1e-6)
    assert torch.equal(from_files.argmax(1), from_memory.argmax(1))


def test_key_scheme_is_the_documented_one(vit_config: ModelConfig, vit_backbone: SiteBackbone) -> None:
    task = random_task(vit_config, vit_backbone.site_dims, 4, 3, torch.Generator().manual_seed(0))
    experts = artifacts.task_expert_tensors(task)
    routers = artifacts.task_router_tensors(task)
    assert "sites.0.expert.down.weight" in experts
    assert "sites.0.perceptron.linear.weight" in experts
    assert experts["sites.0.expert.down.weight"].shape == (vit_config.expert_dim, vit_backbone.site_dims[0])
    assert routers["sites.0.router.weight"].shape == (5, vit_backbone.site_dims[0])  # task 5 gates experts 1..5
    assert len(routers) == 2 * vit_backbone.num_sites


def test_artifacts_of_another_configuration_or_backbone_are_refused(
    vit_config: ModelConfig, vit_backbone: SiteBackbone, cnn_backbone: SiteBackbone
) -> None:
    dims = vit_backbone.site_dims
    task = random_task(vit_config, dims, 0, 2, torch.Generator().manual_seed(0))
    meta = artifacts.metadata(vit_config, artifacts.KIND_TASK_EXPERTS, dims)
    other = ModelConfig(backbone="test_vit", image_size=32, expert_dim=8)
    with pytest.raises(artifacts.IncompatibleArtifactError, match="expert_dim=16 .running: 8."):
        artifacts.check_metadata(meta, other, artifacts.KIND_TASK_EXPERTS, "e0.st")
    with pytest.raises(artifacts.IncompatibleArtifactError, match="expected 'task-routers'"):
        artifacts.check_metadata(meta, vit_config, artifacts.KIND_TASK_ROUTERS, "e0.st")
    # Tensors made on the ViT do not fit the CNN's site dimensions: the error names the tensor and the shapes.
    with pytest.raises(artifacts.IncompatibleArtifactError, match="sites.0.expert.norm.weight.*another backbone"):
        artifacts.task_stacks_from_tensors(
            artifacts.task_expert_tensors(task), vit_config, cnn_backbone.site_dims, 2, "x"
        )
    broken = artifacts.task_router_tensors(task)
    del broken["sites.1.router.bias"]
    with pytest.raises(artifacts.IncompatibleArtifactError, match="missing tensor 'sites.1.router.bias'"):
        artifacts.routers_from_tensors(broken, 0, dims, "r0.st")


def test_trainer_state_round_trip(tmp_path: Path) -> None:
    stats = ClassStatistics(torch.randn(3, 5), torch.rand(3, 5), torch.tensor([4, 5, 6]))
    path = tmp_path / "state.st"
    save_file(artifacts.trainer_state_tensors(stats.to_tensors()), str(path))
    loaded = ClassStatistics.from_tensors(artifacts.trainer_state_from_tensors(load_file(str(path))))
    assert torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.spread, stats.spread)
    assert loaded.mode == "diagonal"
