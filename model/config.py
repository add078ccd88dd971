"""Configuration of the BR-MoE model and of the per-task trainer.

`ModelConfig` describes everything that shapes the learned tensors: a task artifact made under one
configuration cannot be loaded under another, so it travels as metadata with every artifact and its
fingerprint is checked on load. `TrainConfig` is the training budget; it does not change tensor shapes and
may differ from task to task.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

DEFAULT_BACKBONE = "efficientnet_lite0"

# CNN sites used when none are configured: block outputs of the last three stages (14x14 and 7x7 maps at 224 px).
# Earlier stages are where EfficientNet-Lite0 spends most of its time on a CPU, so keeping sites late keeps both
# training (only the part above the first site is re-run per epoch) and the fast path cheap.
DEFAULT_CNN_SITES: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": (
        "blocks.4.0",
        "blocks.4.1",
        "blocks.4.2",
        "blocks.5.0",
        "blocks.5.1",
        "blocks.5.2",
        "blocks.5.3",
        "blocks.6.0",
    ),
}

CovarianceMode = Literal["full", "diagonal"]
# The served head: "analytic" (ridge regression on random ReLU features of phi, solved in closed form from
# statistics accumulated over every task; model/head.py) or "cosine" (CaRE's cosine classifier with Gaussian-replay
# alignment, the paper's method, kept as `care-reference`).
HeadKind = Literal["analytic", "cosine"]
# How tasks adapt the backbone at the sites: "care" (BR-MoE experts, routers and perceptrons; model/moe.py) or
# "moram" (rank-one associative-memory atoms that score themselves, no router; model/moram.py) or "seta" (shared
# experts under elastic anchoring plus gated unique experts, as inferred from SETA's abstract; model/seta.py).
MethodKind = Literal["care", "moram", "seta"]
METHODS: tuple[str, ...] = ("care", "moram", "seta")
# Fields that only shape one method's model. Under any other method they must keep their defaults and are left
# out of `to_dict` (under "care" with `method` itself), so a configuration written before the switch existed
# keeps its fingerprint, and adding a method's fields does not change another method's.
MORAM_FIELDS: tuple[str, ...] = (
    "moram_rank",
    "moram_top_k",
    "moram_temperature",
    "moram_threshold",
    "moram_candidates",
)
SETA_FIELDS: tuple[str, ...] = ("seta_top_k", "seta_gate_scale", "seta_anchor")
METHOD_FIELDS: dict[str, tuple[str, ...]] = {"care": (), "moram": MORAM_FIELDS, "seta": SETA_FIELDS}


@dataclass(frozen=True)
class ModelConfig:
    """Shape-defining settings of CaRE on one backbone.

    Attributes:
        backbone: timm model name.
        sites: Where BR-MoE modules sit. ViTs: block indices as strings ("0".."11"); an empty tuple means every
            block (CaRE's placement). CNNs: module paths of blocks whose output is adapted ("blocks.5.3"); empty
            means the backbone's default list.
        expert_dim: Bottleneck of each task expert E_t (CaRE: 16).
        shared_dim: Bottleneck of the shared expert E_bar (CaRE: 64).
        top_routers: M, routers selected per site by lowest perceptron entropy (CaRE: 2).
        top_experts: K, experts each selected router activates (CaRE: 3).
        expert_dropout: Dropout inside experts while training (CaRE: 0.1).
        cosine_scale: tau, the scale of cosine logits in the losses and in served probabilities (CaRE: 20).
        image_size: Input resolution (square); None means the backbone's pretrained resolution.
        head: The served head: "analytic" (closed form, the default) or "cosine" (CaRE's, with alignment).
        method: "care" (the default), "moram" (model/moram.py) or "seta" (model/seta.py).
        moram_rank: MoRAM: rank-one atoms each task adds at every site (the code's r; X-TAIL: 16).
        moram_top_k: MoRAM: atoms each token activates (the code uses max(top_k, 2)).
        moram_temperature: MoRAM: tau of the softmax over the top-k scores (X-TAIL: 0.01).
        moram_threshold: MoRAM: delta, the evaluation-only cut on normalised scores (0 disables it; code: 0.2).
        moram_candidates: MoRAM: 0 is the published form (every token scores every atom, cost grows with tasks);
            n > 0 bounds it: each sample preselects n atoms by its routing vector and its tokens score only those
            (this is ours, not the paper's).
        seta_top_k: SETA: unique experts each sample's gate mixes (ours: the paper's k is not public).
        seta_gate_scale: SETA: the scale of the gate's cosine logits (its softmax temperature is 1 / scale).
        seta_anchor: SETA: lambda, the stiffness of the elastic anchor on the shared experts (unitless: the penalty
            is divided by the mean importance; applied as a proximal step, so any value is stable).
    """

    backbone: str = DEFAULT_BACKBONE
    sites: tuple[str, ...] = ()
    expert_dim: int = 16
    shared_dim: int = 64
    top_routers: int = 2
    top_experts: int = 3
    expert_dropout: float = 0.1
    cosine_scale: float = 20.0
    image_size: int | None = None
    head: HeadKind = "analytic"
    method: MethodKind = "care"
    moram_rank: int = 16
    moram_top_k: int = 16
    moram_temperature: float = 0.01
    moram_threshold: float = 0.2
    moram_candidates: int = 0
    seta_top_k: int = 2
    seta_gate_scale: float = 10.0
    seta_anchor: float = 100.0

    def __post_init__(self) -> None:
        if self.head not in ("analytic", "cosine"):
            raise ValueError(f"ModelConfig.head must be 'analytic' or 'cosine', got {self.head!r}")
        self._check_method()
        for name in ("expert_dim", "shared_dim", "top_routers", "top_experts"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"ModelConfig.expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"ModelConfig.image_size must be >= 16 pixels, got {self.image_size}")

    def _check_method(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"ModelConfig.method must be one of {list(METHODS)}, got {self.method!r}")
        for method, names in METHOD_FIELDS.items():
            changed = [name for name in names if method != self.method and getattr(self, name) != _DEFAULTS[name]]
            if changed:
                raise ValueError(f"ModelConfig fields {changed} apply only with method={method!r}")
        if self.method == "seta" and (self.seta_top_k < 1 or not self.seta_gate_scale > 0 or self.seta_anchor < 0):
            raise ValueError(
                "ModelConfig needs seta_top_k >= 1, seta_gate_scale > 0 and seta_anchor >= 0, got "
                f"{self.seta_top_k}, {self.seta_gate_scale}, {self.seta_anchor}"
            )
        if self.method != "care" and self.head != "analytic":
            raise ValueError(f"method {self.method!r} serves the analytic head only (head='analytic')")
        if self.method != "moram":
            return
        for name in ("moram_rank", "moram_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.moram_candidates < 0:
            raise ValueError(f"ModelConfig.moram_candidates must be >= 0, got {self.moram_candidates}")
        if not self.moram_temperature > 0 or self.moram_threshold < 0:
            raise ValueError(
                "ModelConfig needs moram_temperature > 0 and moram_threshold >= 0, got "
                f"{self.moram_temperature}, {self.moram_threshold}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists). Other methods' fields are left out, and under "care" the method
        too, so configurations recorded before the method switch existed keep their fingerprint."""
        data = asdict(self)
        data["sites"] = list(self.sites)
        for method, names in METHOD_FIELDS.items():
            if method != self.method:
                for name in names:
                    del data[name]
        if self.method == "care":
            del data["method"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error so that a newer artifact is not misread. A dict without
        `method` is a CaRE configuration (as every one recorded before the switch)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; this artifact was made by a newer care-serve")
        values = dict(data)
        if "sites" in values:
            values["sites"] = tuple(str(s) for s in values["sites"])
        return cls(**values)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form; equal fingerprints mean interchangeable artifacts."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ModelConfig)}


@dataclass(frozen=True)
class TrainConfig:
    """The training budget and optimisation settings of one task.

    Defaults are sized so that a task of 2 classes x 100 images trains in under two minutes on a 2-core CPU with
    the bundled EfficientNet-Lite0; CaRE's paper recipe is 20 epochs, batch 16, lr 0.01.

    Attributes:
        epochs: Epochs over the task's images. From the second task on they are split into two stages of
            epochs // 2 (and the remainder), each followed by classifier alignment, as in CaRE's code.
        batch_size: Mini-batch size.
        lr: Initial SGD learning rate (cosine-annealed per epoch to 0; stage 2 restarts at lr / 2).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        aux_weight: Weight of the per-site perceptron loss (CaRE's code: the mean over sites of (CE + KL) / 2).
        covariance: Per-class statistics for classifier alignment: "full" covariance or "diagonal" variance.
        align_epochs: Epochs of classifier alignment after each stage (0 disables alignment).
        align_lr: SGD learning rate of classifier alignment.
        align_samples_per_class: Gaussian samples drawn per seen class and alignment epoch.
        align_batch_size: Mini-batch size of classifier alignment.
        seed: Seeds every random choice of the task (initialisation, shuffling, dropout, replay).
        min_steps: Fewest optimiser steps a task trains for: tiny tasks get more epochs, so that a task of a few
            images still moves its experts (0 keeps the bare epoch count, as CaRE does). A task of 2 classes x 100
            images at batch 16 already trains 130 steps in 10 epochs; a one-class task of 30 images gets 30 epochs.
        old_class_negatives: Train the new classes against the (fixed) classifier rows of every earlier class as
            well, not only against each other, so a one-class task has a contrast to learn from (CaRE: off).
        expert_scale_init: Initial per-channel output scale of a new task's experts (CaRE: 0, the adapted model starts
            as the pre-trained one; with 0 the experts' other weights get no gradient until the scale has grown).
        ridge_ratio: A fixed ridge of the analytic head, as a fraction of the mean eigenvalue of its scatter; None
            chooses it per version by the leave-one-out likelihood of every image learned so far (model/head.py).
    """

    epochs: int = 10
    batch_size: int = 16
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    aux_weight: float = 1.0
    covariance: CovarianceMode = "diagonal"
    align_epochs: int = 5
    align_lr: float = 0.005
    align_samples_per_class: int = 64
    align_batch_size: int = 128
    seed: int = 1993
    min_steps: int = 60
    old_class_negatives: bool = True
    ridge_ratio: float | None = None
    expert_scale_init: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"TrainConfig needs epochs >= 1 and batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if self.covariance not in ("full", "diagonal"):
            raise ValueError(f"TrainConfig.covariance must be 'full' or 'diagonal', got {self.covariance!r}")
        if self.align_epochs < 0 or self.align_samples_per_class < 1:
            raise ValueError("TrainConfig.align_epochs must be >= 0 and align_samples_per_class >= 1")
        if self.min_steps < 0 or (self.ridge_ratio is not None and not self.ridge_ratio > 0):
            raise ValueError(
                f"TrainConfig needs min_steps >= 0 and ridge_ratio > 0, got {self.min_steps}, {self.ridge_ratio}"
            )
