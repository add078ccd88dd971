"""Builders of small, real registry versions for the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from registry import Manifest, Registry, TaskRecord, TensorFile, task_file_path, version_file_path

BACKBONE = "test_vit"
CONFIG: dict[str, object] = {"embed_dim": 8, "top_k": 2, "sites": [0, 1]}


def expert_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "experts.0.fc1.weight": torch.randn(4, 8, generator=gen),
        "experts.0.fc1.bias": torch.randn(4, generator=gen),
        "experts.1.fc1.weight": torch.randn(4, 8, generator=gen),
    }


def router_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    return {"router.0.gate.weight": torch.randn(3, 8, generator=gen)}


def classifier_tensors(n_tasks: int) -> dict[str, torch.Tensor]:
    return {"head.weight": torch.full((2 * n_tasks, 8), float(n_tasks))}


def publish_task(
    reg: Registry,
    parent: Manifest | None,
    task_id: str,
    *,
    seed: int = 0,
    trainer_state: bool = True,
    backbone: str = BACKBONE,
    config: dict[str, object] | None = None,
) -> Manifest:
    """Publish the parent's tasks plus one new task (experts + routers), a new classifier and trainer state."""
    old_tasks = parent.tasks if parent is not None else ()
    version = (parent.version if parent is not None else 0) + 1
    experts = task_file_path(len(old_tasks) + 1, task_id, "experts")
    routers = task_file_path(len(old_tasks) + 1, task_id, "routers")
    classifier = version_file_path(version, "classifier")
    task = TaskRecord(
        task_id=task_id,
        name=f"Task {task_id}",
        classes=(f"{task_id}-a", f"{task_id}-b"),
        files={"experts": experts, "routers": routers},
    )
    stats = {"class_means": torch.full((2 * (len(old_tasks) + 1), 8), float(version))}
    return reg.publish(
        parent=parent.version if parent is not None else None,
        backbone=backbone,
        model_config=CONFIG if config is None else config,
        tasks=[*old_tasks, task],
        new_files={
            experts: TensorFile(expert_tensors(seed), {"task_id": task_id}),
            routers: TensorFile(router_tensors(seed)),
            classifier: TensorFile(classifier_tensors(len(old_tasks) + 1), {"version": str(version)}),
        },
        version_files={"classifier": classifier},
        trainer_state=TensorFile(stats, {"kind": "stats"}) if trainer_state else None,
        extra={"accuracy": 0.5 + version / 100},
    )


def files_under(root: Path) -> list[str]:
    """Every regular file below ``root``, as sorted relative paths."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def temp_files_under(root: Path) -> list[str]:
    return [name for name in files_under(root) if name.rsplit("/", 1)[-1].startswith(".") and name != ".lock"]
