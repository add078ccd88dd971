"""The methods `care-bench accuracy` compares (bench/accuracy.py runs them): each learns a task's embedded images
and predicts test images, on one shared frozen backbone. See bench/accuracy.py for what each method is."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from bench.baselines import RanPAC, SimpleCIL
from model.backbone import SiteBackbone
from model.config import ModelConfig, TrainConfig
from model.head import AnalyticHead, HeadStatistics, block_scales, head_inputs, solve_head
from model.moram import MoramLineage, MoramModel, advance_moram, learn_moram_task_embedded
from model.network import CareModel, run_sites
from model.seta import SetaLineage, SetaModel, advance_seta, learn_seta_task_embedded
from model.trainer import Lineage, advance, head_block_dims, learn_task_embedded

CHUNK = 128  # images per no-grad forward chunk


@dataclass
class TaskData:
    """One task's images as the methods consume them."""

    embedded: Tensor  # backbone output below the first site (CaRE)
    features: Tensor  # (N, D) unadapted pooled features (baselines)
    head_inputs: Tensor  # (N, D') the analytic head's inputs from the unadapted backbone (head-frozen)
    labels: Tensor  # (N,) global class indices


class Method(Protocol):
    name: str

    def learn(self, data: TaskData, num_classes: int) -> None: ...

    def predict(self, data: TaskData) -> Tensor: ...

    def state_bytes(self) -> int: ...

    def details(self) -> dict[str, Any]:
        """Per-task numbers that explain the curve (written to the JSON as they are)."""
        ...


class FeatureMethod:
    """Adapts a baseline on pooled features (SimpleCIL, RanPAC) to the benchmark."""

    def __init__(self, name: str, classifier: SimpleCIL | RanPAC) -> None:
        self.name = name
        self.classifier = classifier

    def learn(self, data: TaskData, num_classes: int) -> None:  # noqa: ARG002 - the labels say it all
        self.classifier.learn(data.features, data.labels)

    def predict(self, data: TaskData) -> Tensor:
        return self.classifier.predict(data.features)

    def state_bytes(self) -> int:
        tensors = [v for v in vars(self.classifier).values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def details(self) -> dict[str, Any]:
        # RanPAC picks its ridge per task from the task's own held-out images; the choice explains its jumps.
        if isinstance(self.classifier, RanPAC):
            return {"selected_ridges": list(self.classifier.selected_ridges)}
        return {}


class FrozenHeadMethod:
    """The served analytic head on the frozen backbone's features: the served classifier without experts."""

    def __init__(self, name: str, block_dims: list[int], train: TrainConfig) -> None:
        self.name = name
        self.block_dims = block_dims
        self.train = train
        self.statistics: HeadStatistics | None = None
        self.head: AnalyticHead | None = None

    def learn(self, data: TaskData, num_classes: int) -> None:
        inputs = data.head_inputs
        previous = 1.0
        if self.head is None:
            scale = block_scales(inputs, self.block_dims)
            self.statistics = HeadStatistics.empty(inputs.shape[1])
        else:
            scale, previous = self.head.scale, self.head.temperature
        assert self.statistics is not None
        offset = self.statistics.num_classes
        self.statistics = self.statistics.add(inputs * scale, data.labels - offset, num_classes)
        self.head, self.statistics = solve_head(
            self.statistics, scale, (inputs, data.labels), self.train.ridge_ratio, previous
        )

    def predict(self, data: TaskData) -> Tensor:
        assert self.head is not None
        head = self.head
        return torch.cat([head.scores(c).argmax(dim=1) for c in data.head_inputs.split(CHUNK)])

    def state_bytes(self) -> int:
        assert self.statistics is not None and self.head is not None
        tensors = [*self.statistics.to_tensors().values(), *self.head.to_tensors().values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def details(self) -> dict[str, Any]:
        return {}


class _HeadInputs(Protocol):
    def head_inputs_from_embedding(self, hidden: Tensor) -> Tensor: ...

    def scores(self, inputs: Tensor) -> Tensor: ...


def served_predictions(model: _HeadInputs, embedded: Tensor) -> Tensor:
    """The served head's argmax over every class of embedded images, in no-grad chunks (MoRAM's, SETA's network)."""
    return torch.cat(
        [
            model.scores(model.head_inputs_from_embedding(embedded[i : i + CHUNK])).argmax(dim=1)
            for i in range(0, len(embedded), CHUNK)
        ]
    )


def lineage_bytes(
    classifier: Tensor, statistics: HeadStatistics | None, head: AnalyticHead | None, bank: list[Tensor]
) -> int:
    """What a method keeps to continue: the cosine rows, the analytic head and its statistics, and its bank."""
    tensors = [classifier, *bank]
    if statistics is not None and head is not None:
        tensors += [*statistics.to_tensors().values(), *head.to_tensors().values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class MoramMethod:
    """MoRAM through the trainer and the served network the worker and the server use under `CARE_METHOD=moram`."""

    def __init__(self, name: str, backbone: SiteBackbone, config: ModelConfig, train: TrainConfig) -> None:
        self.name = name
        self.backbone, self.config, self.train = backbone, config, train
        self.lineage = MoramLineage.empty(backbone.feature_dim)
        self.offset = 0
        self.task_seconds: list[float] = []

    def learn(self, data: TaskData, num_classes: int) -> None:
        local = data.labels - self.offset
        learned = learn_moram_task_embedded(
            self.backbone, self.config, self.train, self.lineage, data.embedded, local, num_classes
        )
        self.task_seconds.append(learned.metrics["seconds"])
        self.lineage = advance_moram(self.lineage, learned, self.config.moram_rank)
        self.offset += num_classes

    def predict(self, data: TaskData) -> Tensor:
        lineage = self.lineage
        assert lineage.bank is not None
        model = MoramModel(self.config, self.backbone, lineage.bank, lineage.classifier, lineage.head)
        return served_predictions(model, data.embedded)

    def state_bytes(self) -> int:
        lineage = self.lineage
        bank = [] if lineage.bank is None else [t for s in lineage.bank.sites for t in (s.atoms.keys, s.atoms.values)]
        return lineage_bytes(lineage.classifier, lineage.head_statistics, lineage.head, bank)

    def details(self) -> dict[str, Any]:
        bank = self.lineage.bank
        return {
            "task_train_seconds": [round(seconds, 2) for seconds in self.task_seconds],
            "atoms_per_site": 0 if bank is None else bank.num_atoms,
            "moram_config": {key: value for key, value in self.config.to_dict().items() if key.startswith("moram_")},
        }


class CareMethod:
    """CaRE through the service's own trainer; routers stay in memory."""

    def __init__(self, name: str, backbone: SiteBackbone, config: ModelConfig, train: TrainConfig) -> None:
        self.name = name
        self.backbone, self.config, self.train = backbone, config, train
        self.lineage = Lineage.empty(backbone.feature_dim)
        self.offset = 0
        self.task_seconds: list[float] = []

    def learn(self, data: TaskData, num_classes: int) -> None:
        local = data.labels - self.offset
        learned = learn_task_embedded(
            self.backbone, self.config, self.train, self.lineage, data.embedded, local, num_classes
        )
        self.task_seconds.append(learned.metrics["seconds"])
        self.lineage = advance(self.lineage, learned, self.backbone.site_dims, self.config)
        self.offset += num_classes

    def predict(self, data: TaskData) -> Tensor:
        assert self.lineage.bank is not None
        self.probe = data  # the latest test images, for `expert_effect`
        model = CareModel(self.config, self.backbone, self.lineage.bank, self.lineage.classifier, self.lineage.head)
        return torch.cat(
            [
                model.logits_from_embedding(data.embedded[i : i + CHUNK], self.lineage.routers).argmax(dim=1)
                for i in range(0, len(data.embedded), CHUNK)
            ]
        )

    def state_bytes(self) -> int:
        lineage = self.lineage
        total = lineage.classifier.numel() * 4
        if lineage.statistics is not None:
            total += sum(t.numel() * t.element_size() for t in lineage.statistics.to_tensors().values())
        if lineage.head_statistics is not None and lineage.head is not None:
            for tensors in (lineage.head_statistics.to_tensors(), lineage.head.to_tensors()):
                total += sum(t.numel() * t.element_size() for t in tensors.values())
        if lineage.bank is not None:
            for site in lineage.bank.sites:
                for stack in (site.experts, site.shared):
                    total += sum(t.numel() * 4 for t in vars(stack).values() if isinstance(t, Tensor))
                total += site.perceptrons.weight.numel() * 4 + site.perceptrons.bias.numel() * 4
        routers = getattr(lineage.routers, "routers", [])
        total += sum(w.numel() * 4 + b.numel() * 4 for task in routers for w, b in task)
        return int(total)

    def details(self) -> dict[str, Any]:
        return {"task_train_seconds": [round(seconds, 2) for seconds in self.task_seconds], **self.expert_effect()}

    def expert_effect(self) -> dict[str, Any]:
        """How much the experts change what the head reads, per site: mean |s| of the task experts' output scales,
        and ||v_adapted - v_frozen|| / ||v_frozen|| of each site's pooled input (and of phi) on the latest test
        images (a site's input carries every earlier site's adaptation)."""
        bank, probe = self.lineage.bank, getattr(self, "probe", None)
        if bank is None or probe is None:
            return {}
        model = CareModel(self.config, self.backbone, bank, self.lineage.classifier)
        rows = probe.embedded[:CHUNK]
        adapted_phi, adapted = model.features_and_site_vectors(rows, self.lineage.routers)
        frozen: list[Tensor] = []
        with torch.no_grad():
            frozen_phi = run_sites(self.backbone, rows, no_adapter, frozen)

        def change(new: Tensor, old: Tensor) -> float:
            return round(float(((new - old).norm(dim=1) / old.norm(dim=1).clamp_min(1e-12)).mean()), 5)

        return {
            "expert_scale_abs_mean": [round(float(site.experts.scale.abs().mean()), 5) for site in bank.sites],
            "site_input_change": [change(a, f) for a, f in zip(adapted, frozen, strict=True)],
            "feature_change": change(adapted_phi, frozen_phi),
        }


class FirstSessionMethod:
    """Issue 11's attempt at experts that help without drift: first-session adaptation (RanPAC/APER's recipe) on
    CaRE's experts. The first task trains its experts with a non-zero output scale (`first_scale`); afterwards no
    experts are trained and every image, old or new, is read through that one task's experts, so the features the
    head's statistics were taken on never move. `with_frozen` appends the frozen head inputs (the head can only
    gain from the adapted block). Not the served method: an experiment measured side by side."""

    def __init__(
        self,
        name: str,
        backbone: SiteBackbone,
        config: ModelConfig,
        train: TrainConfig,
        first_scale: float,
        with_frozen: bool,
    ) -> None:
        self.name = name
        self.backbone, self.config = backbone, config
        self.train = dataclasses.replace(train, expert_scale_init=first_scale)
        self.with_frozen = with_frozen
        dims = head_block_dims(backbone)
        self.head_method = FrozenHeadMethod(name, [*dims, *dims] if with_frozen else dims, train)
        self.network: CareModel | None = None
        self.lineage: Lineage | None = None

    def _inputs(self, data: TaskData) -> TaskData:
        assert self.network is not None and self.lineage is not None
        network, routers = self.network, self.lineage.routers
        adapted = torch.cat(
            [
                head_inputs(*network.features_and_site_vectors(data.embedded[i : i + CHUNK], routers)).clone()
                for i in range(0, len(data.embedded), CHUNK)
            ]
        )
        inputs = torch.cat([data.head_inputs, adapted], dim=1) if self.with_frozen else adapted
        return dataclasses.replace(data, head_inputs=inputs)

    def learn(self, data: TaskData, num_classes: int) -> None:
        if self.network is None:
            lineage = Lineage.empty(self.backbone.feature_dim)
            learned = learn_task_embedded(
                self.backbone, self.config, self.train, lineage, data.embedded, data.labels, num_classes
            )
            self.lineage = advance(lineage, learned, self.backbone.site_dims, self.config)
            assert self.lineage.bank is not None
            self.network = CareModel(self.config, self.backbone, self.lineage.bank, self.lineage.classifier)
        self.head_method.learn(self._inputs(data), num_classes)

    def predict(self, data: TaskData) -> Tensor:
        return self.head_method.predict(self._inputs(data))

    def state_bytes(self) -> int:
        return self.head_method.state_bytes()

    def details(self) -> dict[str, Any]:
        return {"first_scale": self.train.expert_scale_init, "with_frozen": self.with_frozen}


def no_adapter(_site: int) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda tokens, _routing: torch.zeros_like(tokens)


class SetaMethod:
    """SETA (inferred) through the trainer and the served network the worker and the server use under
    `CARE_METHOD=seta`."""

    def __init__(self, name: str, backbone: SiteBackbone, config: ModelConfig, train: TrainConfig) -> None:
        self.name = name
        self.backbone, self.config, self.train = backbone, config, train
        self.lineage = SetaLineage.empty(backbone.feature_dim)
        self.offset = 0
        self.task_seconds: list[float] = []
        self.drift: list[float] = []
        self.shared_scale: list[float] = []

    def learn(self, data: TaskData, num_classes: int) -> None:
        local = data.labels - self.offset
        learned = learn_seta_task_embedded(
            self.backbone, self.config, self.train, self.lineage, data.embedded, local, num_classes
        )
        self.task_seconds.append(learned.metrics["seconds"])
        self.drift.append(learned.metrics["shared_drift"])
        self.shared_scale.append(learned.metrics["shared_scale"])
        self.lineage = advance_seta(self.lineage, learned, self.config.expert_dim)
        self.offset += num_classes

    def predict(self, data: TaskData) -> Tensor:
        lineage = self.lineage
        assert lineage.bank is not None
        model = SetaModel(self.config, self.backbone, lineage.bank, lineage.classifier, lineage.head)
        return served_predictions(model, data.embedded)

    def state_bytes(self) -> int:
        lineage = self.lineage
        bank = []
        for site in [] if lineage.bank is None else lineage.bank.sites:
            bank += [site.gates, *vars(site.shared).values(), *vars(site.unique).values()]
        return lineage_bytes(lineage.classifier, lineage.head_statistics, lineage.head, bank)

    def details(self) -> dict[str, Any]:
        return {
            "task_train_seconds": [round(seconds, 2) for seconds in self.task_seconds],
            "shared_drift": [round(value, 5) for value in self.drift],
            "shared_scale": [round(value, 6) for value in self.shared_scale],
            "seta_config": {key: value for key, value in self.config.to_dict().items() if key.startswith("seta_")},
        }
