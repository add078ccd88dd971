"""Continual-learning metrics for the class-incremental benchmark: A_B, A-bar and forgetting.

Notation: after stage ``k`` (0-based; stage ``k`` learns task ``k``) the model is tested on the test set of every
task ``j <= k``; ``a[k][j]`` is the accuracy on task ``j``'s test data and ``overall[k]`` the accuracy on the union
of all seen tasks' test data (every test sample counts once, as in LAMDA-PILOT's "accuracy on all seen classes").
Accuracies are fractions in [0, 1]; multiply by 100 to compare with published tables.

* A_B (last accuracy) = ``overall[-1]``.
* A-bar (average incremental accuracy) = mean over stages of ``overall[k]``.
* Forgetting after the last stage ``T`` (Chaudhry et al., 2018): for each task ``j < T``,
  ``f_j = max_{j <= k < T} a[k][j] - a[T][j]``; forgetting = mean over ``j`` of ``f_j``. It is not clamped, so a
  task that improved later contributes a negative ``f_j``; with a single stage it is 0.0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AccuracyMatrix",
    "StageResult",
    "average_incremental_accuracy",
    "evaluate_stage",
    "forgetting",
    "last_accuracy",
]


def last_accuracy(overall: Sequence[float]) -> float:
    """A_B: accuracy on all seen classes after the last stage.

    Args:
        overall: All-seen accuracy after each stage.

    Returns:
        The last value.
    """
    if not overall:
        raise ValueError("no stage recorded")
    return float(overall[-1])


def average_incremental_accuracy(overall: Sequence[float]) -> float:
    """A-bar: mean over stages of the accuracy on all classes seen so far.

    Args:
        overall: All-seen accuracy after each stage.

    Returns:
        The mean of the curve.
    """
    if not overall:
        raise ValueError("no stage recorded")
    return float(sum(overall) / len(overall))


def _check_triangular(task_accuracy: Sequence[Sequence[float]]) -> None:
    for k, row in enumerate(task_accuracy):
        if len(row) != k + 1:
            raise ValueError(f"stage {k} must hold accuracies for tasks 0..{k} ({k + 1} values), got {len(row)}")


def forgetting(task_accuracy: Sequence[Sequence[float]]) -> float:
    """Average forgetting after the last stage (see the module docstring).

    Args:
        task_accuracy: Lower-triangular ``a[k][j]``: row ``k`` holds the accuracies on tasks ``0..k``.

    Returns:
        Mean over earlier tasks of (best earlier accuracy - final accuracy); 0.0 with a single stage.
    """
    _check_triangular(task_accuracy)
    if not task_accuracy:
        raise ValueError("no stage recorded")
    last = len(task_accuracy) - 1
    if last == 0:
        return 0.0
    drops = [max(task_accuracy[k][j] for k in range(j, last)) - task_accuracy[last][j] for j in range(last)]
    return float(sum(drops) / len(drops))


@dataclass(frozen=True)
class StageResult:
    """Test accuracies after one stage.

    Attributes:
        task_accuracy: Accuracy on each seen task's test set, task 0 first.
        overall: Accuracy on the union of those test sets.
        num_samples: Test-set size of each task (empty when unknown, e.g. for hand-made results).
    """

    task_accuracy: tuple[float, ...]
    overall: float
    num_samples: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.task_accuracy:
            raise ValueError("a stage must report at least one task")
        if self.num_samples and len(self.num_samples) != len(self.task_accuracy):
            raise ValueError(f"{len(self.num_samples)} sample counts for {len(self.task_accuracy)} tasks")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "task_accuracy": list(self.task_accuracy),
            "overall": self.overall,
            "num_samples": list(self.num_samples),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            task_accuracy=tuple(float(a) for a in data["task_accuracy"]),
            overall=float(data["overall"]),
            num_samples=tuple(int(n) for n in data.get("num_samples", ())),
        )


@dataclass
class AccuracyMatrix:
    """The accuracy matrix ``a[k][j]`` and the all-seen curve of one run, one :class:`StageResult` per stage.

    Attributes:
        stages: Results after stage 0, 1, ...; stage ``k`` must report exactly ``k + 1`` tasks.
    """

    stages: list[StageResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_triangular(self.task_accuracy)

    def append(self, result: StageResult) -> None:
        """Record the results after the next stage."""
        if len(result.task_accuracy) != len(self.stages) + 1:
            raise ValueError(f"stage {len(self.stages)} must report {len(self.stages) + 1} tasks")
        self.stages.append(result)

    @property
    def task_accuracy(self) -> list[list[float]]:
        """The lower-triangular matrix ``a[k][j]``."""
        return [list(s.task_accuracy) for s in self.stages]

    @property
    def overall(self) -> list[float]:
        """All-seen accuracy after each stage."""
        return [s.overall for s in self.stages]

    @property
    def last_accuracy(self) -> float:
        """A_B."""
        return last_accuracy(self.overall)

    @property
    def average_incremental_accuracy(self) -> float:
        """A-bar."""
        return average_incremental_accuracy(self.overall)

    @property
    def forgetting(self) -> float:
        """Average forgetting after the last stage."""
        return forgetting(self.task_accuracy)

    def summary(self) -> dict[str, float]:
        """The three headline metrics (requires at least one stage)."""
        return {
            "last_accuracy": self.last_accuracy,
            "average_incremental_accuracy": self.average_incremental_accuracy,
            "forgetting": self.forgetting,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``summary`` is included for readers and ignored by :meth:`from_dict`."""
        data: dict[str, Any] = {"stages": [s.to_dict() for s in self.stages]}
        if self.stages:
            data["summary"] = self.summary()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyMatrix:
        """Inverse of :meth:`to_dict`."""
        return cls(stages=[StageResult.from_dict(s) for s in data["stages"]])


def evaluate_stage(
    predict_fn: Callable[[Tensor], Tensor],
    test_features_by_task: Sequence[Tensor],
    test_labels_by_task: Sequence[Tensor],
    *,
    batch_size: int | None = None,
) -> StageResult:
    """Test a model on every task seen so far.

    Args:
        predict_fn: Maps (N, D) features to (N,) predicted global class indices.
        test_features_by_task: Test features of tasks ``0..k``, task 0 first.
        test_labels_by_task: The matching (N,) global labels.
        batch_size: Rows per ``predict_fn`` call; None predicts a task's test set in one call.

    Returns:
        Per-task accuracies, the all-seen accuracy (correct / total over the union) and the test-set sizes.
    """
    if len(test_features_by_task) != len(test_labels_by_task) or not test_features_by_task:
        raise ValueError("need the same non-zero number of feature and label tensors")
    correct: list[int] = []
    totals: list[int] = []
    with torch.no_grad():
        for j, (feats, labels) in enumerate(zip(test_features_by_task, test_labels_by_task, strict=True)):
            if feats.shape[0] != labels.shape[0] or labels.numel() == 0:
                raise ValueError(f"task {j}: {feats.shape[0]} feature rows for {labels.shape[0]} labels (need > 0)")
            chunks = feats.split(batch_size) if batch_size else (feats,)
            preds = torch.cat([predict_fn(c).reshape(-1) for c in chunks])
            if preds.shape[0] != labels.shape[0]:
                raise ValueError(f"task {j}: predict_fn returned {preds.shape[0]} predictions for {labels.shape[0]}")
            correct.append(int((preds.long().cpu() == labels.long().cpu()).sum()))
            totals.append(int(labels.shape[0]))
    return StageResult(
        task_accuracy=tuple(c / n for c, n in zip(correct, totals, strict=True)),
        overall=sum(correct) / sum(totals),
        num_samples=tuple(totals),
    )
