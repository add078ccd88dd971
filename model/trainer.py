"""Learning one task with CaRE: no threads, no I/O, seeded and deterministic.

Given what has been learned so far (a `Lineage`) and labelled images of new classes, `learn_task` creates the
task's experts E_T, routers R_T, perceptrons C_T and classifier block w_T (and E_bar with the first task) and
trains them as CaRE's code does:

* losses: CE on scaled cosine logits of the new classes, plus per site the perceptron's CE on 20x raw logits and
  KL to the (detached, unscaled) cosine teacher at temperature 1 (first half of the sites) or 2, averaged as
  (CE + KL) / 2 and then over sites;
* routing while training: R_T is always selected, plus the M-1 lowest-entropy earlier routers;
* SGD with momentum and a cosine schedule per epoch; from the second task on, two stages (lr -> lr/2, then a
  fresh optimiser from lr/2 -> 0), each followed by class statistics and classifier alignment;
* E_T starts from the mean of experts 0..T-2 (the reference code's choice, "for more stable training");
* E_bar is trained with the first task and frozen afterwards. The paper's eq. 6 describes an EMA merge of a
  per-task delta; the reference code instead pulls E_bar back towards a frozen copy on every step with
  mu = 0.999, which leaves it frozen up to ~1e-3 of one SGD step. We implement that effective behaviour (frozen)
  because it is what the published numbers were produced with and it keeps served tasks' outputs stable.

What the frozen backbone computes below the first site is computed once per image, not once per epoch, so the
images are not augmented per epoch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.adapter import TaskModules, adapters, shared_experts
from model.alignment import ClassStatistics, align_classifier, compute_statistics
from model.backbone import SiteBackbone, SiteFn
from model.bank import AdapterStack, ExpertBank, FoldedAdapters, FoldedPerceptrons, PerceptronStack, SiteBank
from model.classifier import cosine_logits
from model.config import ModelConfig, TrainConfig
from model.head import AnalyticHead, HeadStatistics, block_scales, head_inputs, solve_head
from model.moe import RoutingOptions, fast_moe
from model.network import CareModel, run_sites
from model.routers import ResidentRouters, RouterSource, TaskRouters

EMBED_CHUNK = 64  # images per no-grad chunk when embedding below the first site


@dataclass(frozen=True)
class TrainProgress:
    """One progress report. `stage` is "adapt" (training the task's modules) or "align" (classifier alignment)."""

    stage: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float


ProgressFn = Callable[[TrainProgress], None]


@dataclass(frozen=True)
class Lineage:
    """Everything learned so far that training the next task needs.

    Attributes:
        bank: Experts, perceptrons and E_bar of the learned tasks; None before the first task.
        routers: Routers of the learned tasks.
        classifier: (C, D) cosine classifier of all learned classes ((0, D) before the first task).
        statistics: Per-class feature statistics for the cosine head's alignment (None before the first task,
            and always with the analytic head, which does not need them).
        head_statistics: What the analytic head is solved from (None before the first task or with the cosine head).
        head: The served analytic head over every learned class (None before the first task or with the cosine
            head); its input scales are fixed by the first task.
    """

    bank: ExpertBank | None
    routers: RouterSource
    classifier: Tensor
    statistics: ClassStatistics | None
    head_statistics: HeadStatistics | None = None
    head: AnalyticHead | None = None

    @property
    def num_tasks(self) -> int:
        return 0 if self.bank is None else self.bank.num_tasks

    @classmethod
    def empty(cls, feature_dim: int) -> Lineage:
        return cls(None, ResidentRouters(), torch.empty(0, feature_dim), None)

    def to(self, device: torch.device | str) -> Lineage:
        """The lineage with its resident tensors on `device` (routers stay wherever their source keeps them)."""
        bank = None if self.bank is None else self.bank.to(device)
        head = None if self.head is None else self.head.to(device)
        return Lineage(bank, self.routers, self.classifier.to(device), self.statistics, self.head_statistics, head)


@dataclass(frozen=True)
class LearnedTask:
    """The outcome of `learn_task`: the new task's modules and the lineage-wide tensors that changed."""

    index: int
    task: TaskModules
    shared: nn.ModuleList | None  # E_bar, only when the first task was learned
    classifier: Tensor  # (C + n_T, D), every block after alignment
    statistics: ClassStatistics | None  # all classes (cosine head only)
    metrics: dict[str, float] = field(default_factory=dict)
    head: AnalyticHead | None = None  # the served head over every class (analytic head only)
    head_statistics: HeadStatistics | None = None  # what `head` was solved from

    def routers(self) -> TaskRouters:
        routers = [self.task.router(site) for site in range(self.task.num_sites)]
        return [(r.weight.detach(), r.bias.detach()) for r in routers]


class _WithLiveRouters:
    """A router source that serves the task being trained from its live (trainable) modules."""

    def __init__(self, base: RouterSource, task: int, live: TaskRouters) -> None:
        self.base, self.task, self.live = base, task, live

    @contextmanager
    def hold(self, task: int) -> Iterator[TaskRouters]:
        if task == self.task:
            yield self.live
        else:
            with self.base.hold(task) as routers:
                yield routers


def embed_images(backbone: SiteBackbone, images: Tensor) -> Tensor:
    """The frozen backbone below the first site, once per image, in no-grad chunks."""
    with torch.no_grad():
        return torch.cat([backbone.embed(images[i : i + EMBED_CHUNK]) for i in range(0, len(images), EMBED_CHUNK)])


def append_task(bank: ExpertBank | None, learned: LearnedTask, site_dims: list[int], config: ModelConfig) -> ExpertBank:
    """The bank with `learned` appended (created around E_bar when it is the first task)."""
    with torch.no_grad():
        if bank is None:
            if learned.shared is None:
                raise ValueError("the first task must come with its shared expert")
            bank = ExpertBank(
                [
                    SiteBank(
                        AdapterStack.empty(dim, config.expert_dim).to(learned.classifier.device),
                        PerceptronStack.empty(dim).to(learned.classifier.device),
                        AdapterStack.from_modules([adapter]),
                    )
                    for dim, adapter in zip(site_dims, adapters(learned.shared), strict=True)
                ]
            )
        task = learned.task
        experts = [AdapterStack.from_modules([task.expert(s)]) for s in range(task.num_sites)]
        perceptrons = [PerceptronStack.from_modules([task.perceptron(s)]) for s in range(task.num_sites)]
        new_bank = bank.append(experts, perceptrons)
    return new_bank.detach()


def advance(lineage: Lineage, learned: LearnedTask, site_dims: list[int], config: ModelConfig) -> Lineage:
    """The lineage after `learned`, with routers kept in memory (for benchmarks and tests)."""
    if not isinstance(lineage.routers, ResidentRouters):
        raise TypeError("advance() keeps routers in memory; rebuild the lineage from your router store instead")
    return Lineage(
        bank=append_task(lineage.bank, learned, site_dims, config),
        routers=lineage.routers.with_task(learned.routers()),
        classifier=learned.classifier,
        statistics=learned.statistics,
        head_statistics=learned.head_statistics,
        head=learned.head,
    )


class _TaskTrainer:
    """State of one `learn_task` call; split into methods so each training phase reads on its own."""

    def __init__(
        self,
        backbone: SiteBackbone,
        config: ModelConfig,
        train: TrainConfig,
        lineage: Lineage,
        num_classes: int,
        progress: ProgressFn | None,
    ) -> None:
        self.backbone, self.config, self.train, self.lineage = backbone, config, train, lineage
        self.progress = progress
        self.index = lineage.num_tasks
        self.num_classes = num_classes
        self.device = lineage.classifier.device
        self.generator = torch.Generator().manual_seed(train.seed)
        dims = backbone.site_dims
        self.task = TaskModules(dims, config.expert_dim, config.expert_dropout, num_classes, self.index).to(self.device)
        self.shared = (
            shared_experts(dims, config.shared_dim, config.expert_dropout).to(self.device) if self.index == 0 else None
        )
        self.block = nn.Parameter(torch.empty(num_classes, backbone.feature_dim, device=self.device))
        nn.init.trunc_normal_(self.block, std=0.02)
        with torch.no_grad():
            # NOTE: unit-norm rows. The cosine logit's gradient scales with 1/|w|, so CaRE's std-0.02 init leaves
            # small-D backbones with steps far larger than the weights themselves; unit rows make one SGD step mean
            # the same angular change at any feature dimension.
            self.block.copy_(F.normalize(self.block, dim=1))
        self.old_classifier = lineage.classifier
        if train.expert_scale_init:
            # The first experts (later ones start from the mean of earlier ones): a non-zero output scale gives
            # their other weights a gradient from the first step (CaRE's zero scale gives them none until it grows).
            with torch.no_grad():
                for site in range(self.task.num_sites):
                    self.task.expert(site).scale.fill_(train.expert_scale_init)
        self._init_expert_from_mean()
        live = [(self.task.router(s).weight, self.task.router(s).bias) for s in range(self.task.num_sites)]
        self.routers = _WithLiveRouters(lineage.routers, self.index, live)

    def _init_expert_from_mean(self) -> None:
        if self.index < 2 or self.lineage.bank is None:
            return
        with torch.no_grad():
            for site, bank_site in enumerate(self.lineage.bank.sites):
                stack, expert = bank_site.experts, self.task.expert(site)
                expert.norm.weight.copy_(stack.norm_weight[: self.index - 1].mean(0))
                expert.norm.bias.copy_(stack.norm_bias[: self.index - 1].mean(0))
                expert.down.weight.copy_(stack.down_weight[: self.index - 1].mean(0))
                expert.down.bias.copy_(stack.down_bias[: self.index - 1].mean(0))
                expert.up.weight.copy_(stack.up_weight[: self.index - 1].mean(0))
                expert.up.bias.copy_(stack.up_bias[: self.index - 1].mean(0))
                expert.scale.copy_(stack.scale[: self.index - 1].mean(0))

    def _site_tensors(self, site: int) -> tuple[FoldedAdapters, FoldedPerceptrons, FoldedAdapters]:
        experts = AdapterStack.from_modules([self.task.expert(site)]).fold()
        perceptrons = PerceptronStack.from_modules([self.task.perceptron(site)]).fold()
        bank = self.lineage.bank
        if bank is None:
            assert self.shared is not None
            return experts, perceptrons, AdapterStack.from_modules([adapters(self.shared)[site]]).fold()
        old_experts, old_perceptrons, shared = bank.sites[site].folded()
        return (
            FoldedAdapters.concat([old_experts, experts]),
            FoldedPerceptrons.concat([old_perceptrons, perceptrons]),
            shared,
        )

    def features(self, hidden: Tensor, options: RoutingOptions) -> Tensor:
        """Features with the task's router forced (CaRE's "semi-dynamic" training forward)."""

        def site_fn(site: int) -> SiteFn:
            experts, perceptrons, shared = self._site_tensors(site)
            return lambda tokens, routing: fast_moe(
                tokens, routing, experts, perceptrons, shared, site, self.routers, options, self.num_classes
            )

        return run_sites(self.backbone, hidden, site_fn)

    def _parameters(self) -> list[nn.Parameter]:
        params = [*self.task.parameters(), self.block]
        if self.shared is not None:
            params.extend(self.shared.parameters())
        return params

    def loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """CaRE's code loss: CE(tau cos) + mean over sites of (CE(20 u_l) + T^2 KL(teacher_T || u_l / T)) / 2."""
        perceptron_logits: list[Tensor] = []
        options = RoutingOptions(
            self.config.top_routers,
            self.config.top_experts,
            forced_task=self.index,
            dropout=self.config.expert_dropout,
            perceptron_logits=perceptron_logits,
        )
        features = self.features(hidden, options)
        cosines = cosine_logits(features, self.block)
        scale = self.config.cosine_scale
        if self.train.old_class_negatives and len(self.old_classifier):
            # The new classes against every earlier class's (fixed) row too: a contrast even for one new class.
            everything = cosine_logits(features, torch.cat([self.old_classifier.detach(), self.block]))
            main = F.cross_entropy(scale * everything, labels + len(self.old_classifier))
        else:
            main = F.cross_entropy(scale * cosines, labels)
        teacher = cosines.detach()
        half = len(perceptron_logits) / 2
        aux_terms = []
        for site, logits in enumerate(perceptron_logits):
            temperature = 1.0 if site < half else 2.0
            hard = F.cross_entropy(scale * logits, labels)
            soft = F.kl_div(
                F.log_softmax(logits / temperature, dim=-1),
                F.softmax(teacher / temperature, dim=-1),
                reduction="batchmean",
            )
            aux_terms.append((hard + soft * temperature**2) / 2)
        return main + self.train.aux_weight * torch.stack(aux_terms).mean()

    def run_stage(self, hidden: Tensor, labels: Tensor, epochs: int, lr_at: Callable[[int], float]) -> float:
        """`epochs` epochs of SGD on the task's modules; returns the last epoch's mean loss."""
        optimizer = torch.optim.SGD(
            self._parameters(), lr=lr_at(0), momentum=self.train.momentum, weight_decay=self.train.weight_decay
        )
        batch = self.train.batch_size
        steps_per_epoch = math.ceil(len(hidden) / batch)
        epoch_loss = math.nan
        for epoch in range(epochs):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch)
            order = torch.randperm(len(hidden), generator=self.generator).to(self.device)
            total = 0.0
            for step in range(steps_per_epoch):
                rows = order[step * batch : (step + 1) * batch]
                loss = self.loss(hidden[rows], labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                self._report("adapt", epoch, epochs, step, steps_per_epoch, float(loss.detach()))
            epoch_loss = total / steps_per_epoch
        return epoch_loss

    def _report(self, stage: str, epoch: int, epochs: int, step: int, steps: int, loss: float) -> None:
        if self.progress is not None:
            self.progress(TrainProgress(stage, epoch + 1, epochs, epoch * steps + step + 1, epochs * steps, loss))

    def statistics(self, hidden: Tensor, labels: Tensor) -> ClassStatistics:
        """Statistics of the new classes: features with the task id given, no dropout."""
        options = RoutingOptions(self.config.top_routers, self.config.top_experts, forced_task=self.index)
        with torch.no_grad():
            features = torch.cat(
                [self.features(hidden[i : i + EMBED_CHUNK], options) for i in range(0, len(hidden), EMBED_CHUNK)]
            )
        return compute_statistics(features.cpu(), labels.cpu(), self.num_classes, self.train.covariance)

    def align(self, statistics: ClassStatistics) -> float:
        """Classifier alignment over every class seen so far; updates old blocks and w_T."""
        weight = torch.cat([self.old_classifier, self.block.detach()])
        aligned, loss = align_classifier(weight, statistics, self.train, self.config.cosine_scale, self.generator)
        self.old_classifier = aligned[: -self.num_classes]
        with torch.no_grad():
            self.block.copy_(aligned[-self.num_classes :])
        if self.progress is not None:
            self.progress(TrainProgress("align", self.train.align_epochs, self.train.align_epochs, 0, 0, loss))
        return loss

    def with_new_statistics(self, hidden: Tensor, labels: Tensor) -> ClassStatistics:
        new = self.statistics(hidden, labels)
        old = self.lineage.statistics
        return new if old is None else old.extend(new)


def learn_task(
    backbone: SiteBackbone,
    config: ModelConfig,
    train: TrainConfig,
    lineage: Lineage,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    progress: ProgressFn | None = None,
) -> LearnedTask:
    """Learn one task of `num_classes` new classes from preprocessed images (N, 3, H, W) and labels 0..n-1."""
    started = time.perf_counter()
    hidden = embed_images(backbone, images.to(lineage.classifier.device))
    learned = learn_task_embedded(backbone, config, train, lineage, hidden, labels, num_classes, progress)
    total = time.perf_counter() - started
    learned.metrics.update(embed_seconds=total - learned.metrics["seconds"], seconds=total)
    return learned


def learn_task_embedded(
    backbone: SiteBackbone,
    config: ModelConfig,
    train: TrainConfig,
    lineage: Lineage,
    hidden: Tensor,
    labels: Tensor,
    num_classes: int,
    progress: ProgressFn | None = None,
) -> LearnedTask:
    """`learn_task` from the backbone's output below the first site (`embed_images`), for callers that reuse it."""
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes or len(labels) != len(hidden):
        raise ValueError(f"need one label in 0..{num_classes - 1} per image, got {len(labels)} for {len(hidden)}")
    if lineage.statistics is not None and lineage.statistics.mode != train.covariance:
        raise ValueError(
            f"the lineage keeps {lineage.statistics.mode} class statistics; train with covariance="
            f"{lineage.statistics.mode!r}"
        )
    started = time.perf_counter()
    device = lineage.classifier.device
    analytic = config.head == "analytic"
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(train.seed)  # dropout masks
        trainer = _TaskTrainer(backbone, config, train, lineage, num_classes, progress)
        hidden = hidden.to(device)
        labels = labels.to(device)
        lr = train.lr
        epochs = max(train.epochs, math.ceil(train.min_steps / math.ceil(len(hidden) / train.batch_size)))
        align = train.align_epochs > 0 and not analytic  # the analytic head is solved, not aligned
        statistics: ClassStatistics | None = None
        if trainer.index == 0:
            loss = trainer.run_stage(hidden, labels, epochs, lambda e: lr * 0.5 * (1 + math.cos(math.pi * e / epochs)))
        else:
            first = epochs // 2
            second = epochs - first
            loss = math.nan
            if first:
                loss = trainer.run_stage(
                    hidden, labels, first, lambda e: lr * 0.5 * (1 + math.cos(math.pi * e / epochs))
                )
                if align:
                    trainer.align(trainer.with_new_statistics(hidden, labels))
            loss = trainer.run_stage(
                hidden, labels, second, lambda e: lr / 2 * 0.5 * (1 + math.cos(math.pi * e / second))
            )
        if not analytic:
            statistics = trainer.with_new_statistics(hidden, labels)
            if align and trainer.index > 0:
                trainer.align(statistics)
    classifier = torch.cat([trainer.old_classifier, trainer.block.detach()])
    trainer.task.eval().requires_grad_(False)
    if trainer.shared is not None:
        trainer.shared.eval().requires_grad_(False)
    learned = LearnedTask(trainer.index, trainer.task, trainer.shared, classifier, statistics)
    features = served_features(backbone, config, lineage, learned, hidden)
    offset = lineage.classifier.shape[0]
    if analytic:
        learned = _with_analytic_head(learned, lineage, backbone, train, features, labels, offset)
    with torch.no_grad():
        scores = cosine_logits(features, learned.classifier) if learned.head is None else learned.head.scores(features)
        accuracy = float((scores.argmax(dim=1) == labels + offset).float().mean())
    learned.metrics.update(
        train_accuracy=accuracy, final_loss=loss, seconds=time.perf_counter() - started, epochs=float(epochs)
    )
    return learned


def served_features(
    backbone: SiteBackbone, config: ModelConfig, lineage: Lineage, learned: LearnedTask, hidden: Tensor
) -> Tensor:
    """What the served head reads of the task's images as the next version serves them (routed without a task id):
    the analytic head's inputs, unscaled (`model.head.head_inputs`), or phi for the cosine head."""
    bank = append_task(lineage.bank, learned, backbone.site_dims, config)
    routers = _WithLiveRouters(lineage.routers, learned.index, learned.routers())
    model = CareModel(config, backbone, bank, learned.classifier)
    chunks = []
    for start in range(0, len(hidden), EMBED_CHUNK):
        features, vectors = model.features_and_site_vectors(hidden[start : start + EMBED_CHUNK], routers)
        chunks.append(head_inputs(features, vectors) if config.head == "analytic" else features)
    return torch.cat(chunks).clone()  # a normal tensor: callers may keep it beside autograd


def head_block_dims(backbone: SiteBackbone) -> list[int]:
    """Widths of the analytic head's input blocks: phi, then every site's pooled input."""
    return [backbone.feature_dim, *backbone.site_dims]


def _with_analytic_head(
    learned: LearnedTask,
    lineage: Lineage,
    backbone: SiteBackbone,
    train: TrainConfig,
    inputs: Tensor,
    labels: Tensor,
    offset: int,
) -> LearnedTask:
    """`learned` with the analytic head over every class: the task's served inputs added to the statistics."""
    num_new = learned.classifier.shape[0] - offset
    head, statistics = extend_analytic_head(
        lineage.head, lineage.head_statistics, backbone, train, inputs, labels, num_new, offset
    )
    return dataclasses.replace(learned, head=head, head_statistics=statistics)


def extend_analytic_head(
    head: AnalyticHead | None,
    statistics: HeadStatistics | None,
    backbone: SiteBackbone,
    train: TrainConfig,
    inputs: Tensor,
    labels: Tensor,
    num_new: int,
    offset: int,
) -> tuple[AnalyticHead, HeadStatistics]:
    """The analytic head over every class after a task of `num_new` classes (labels 0..n-1, placed from `offset`),
    from the task's served, unscaled head inputs; `head` and `statistics` are the lineage's (None before the first
    task, which fixes the block scales). Any method whose served head is the analytic one learns it here."""
    if head is None:  # the first task fixes the block scales for the lineage
        scale, previous = block_scales(inputs, head_block_dims(backbone)).to(inputs.device), 1.0
    else:
        scale, previous = head.scale, head.temperature
    statistics = statistics or HeadStatistics.empty(inputs.shape[1])
    with torch.no_grad():
        statistics = statistics.add(inputs * scale, labels, num_new)
        return solve_head(statistics, scale, (inputs, labels + offset), train.ridge_ratio, previous)
