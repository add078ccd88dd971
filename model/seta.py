"""SETA at care-serve's sites, as far as it is public: shared experts under elastic anchoring, one unique expert per
task, and one unified gate that picks unique experts without a task id. Method id "seta"; read it as "seta-inferred".

SETA ("Split-on-Share", arXiv 2601.17616; v2 "Sparse Subspace-to-Expert Sharing", arXiv 2606.07500) is known only
from its abstracts: no full text and no code were found (/work/shared/reference/seta-mora.md, section 1). Every
choice below is ours, made to be consistent with the abstract, and is not the paper's method:

* Site: the same `SiteFn` slot as CaRE's BR-MoE, in parallel to the block; delta = shared(x) + gated unique experts.
* Shared expert: one bottleneck adapter per site (`ModelConfig.shared_dim`, CaRE's E_bar shape), always on, and
  trained with *every* task under an EWC-style anchor on theta* = the shared experts as the version being
  continued serves them, weighted by Omega = the sum over earlier tasks of each task's diagonal empirical Fisher
  (mean squared mini-batch gradient of its CE, computed before its images are dropped), normalised to mean 1. The
  quadratic penalty lambda sum_j Omega_j (theta_j - theta*_j)^2 is applied as its proximal step after every SGD
  step, theta <- theta* + (theta - theta*) / (1 + 2 lr lambda Omega_j), which is stable for any lambda
  (`seta_anchor`). Two earlier forms failed, measured: the penalty in the loss with Omega / mean(Omega) diverged on
  the first anchored task (lambda lr Omega_j / mean reaches far past 2 for plain SGD: Omega spans decades); with
  Omega / max(Omega), stable only while lambda lr < 1, the anchor was too weak against the CE gradient, the shared
  experts' output scale grew task after task and glyphs300 collapsed at its 22nd task (88.9 % -> 7.4 %).
* Unique experts: one bottleneck adapter per task and site (`ModelConfig.expert_dim`), frozen after its task.
* Unified gate: per site, one unit row g_t per task; a sample's gate logits are `seta_gate_scale * cos(g_t,
  LN(v))` for its routing vector v (CLS token or spatial mean: per sample, not per token, so the gate costs T d
  once per sample and the experts run on k of T). The top `seta_top_k` unique experts mix with softmax weights.
  A task's row is initialised at the mean of its images' normalised routing vectors, trained with CE towards its
  own index over every row (old rows frozen; the task id is known while training, never at inference), and then
  frozen. Being a unit row with a fixed scale, a new row cannot outbid the old ones by growing: the recency
  routing a gate without replay is prone to (the reference, section 3.2) is bounded by how close the new data's
  routing vectors are to the old rows.
* While a task trains, its own expert is always among the k selected (with the k - 1 best earlier ones), weighted
  by the same softmax as at inference, so training and serving compute the same mix.
* Left out: "split" (the abstract's splitting of updates between shared and unique experts by gradient
  sensitivity) and v2's routing-aware regulariser; the anchor's Omega uses the Fisher, not "gradient sensitivity".
* Head: the analytic head, solved from the served features of each task as it is learned (as CaRE's and MoRAM's).
  The shared experts move a little with every task, so earlier classes' statistics grow stale by that much; the
  anchor is what bounds it.

Registry: a SETA version writes its own shared file (the shared experts after its task) and keeps Omega in its
trainer state; each task file holds its unique experts and gate rows. Rolling back to a version therefore serves,
and continues training from, exactly that version's shared experts and anchor.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.adapter import LAYER_NORM_EPS, Adapter, adapters, shared_experts
from model.backbone import SiteBackbone, SiteFn
from model.bank import AdapterStack, FoldedAdapters
from model.config import ModelConfig, TrainConfig
from model.head import AnalyticHead, HeadStatistics, head_inputs
from model.loop import new_class_loss, sgd_epochs
from model.network import ServedHead, run_sites
from model.routers import RouterSource
from model.trainer import EMBED_CHUNK, ProgressFn, embed_images, extend_analytic_head

SetaPath = Literal["fast", "reference"]


def _normalize(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)


def gate_logits(routing: Tensor, rows: Tensor, scale: float) -> Tensor:
    """(B, T) gate logits: `scale` times the cosine of each sample's normalised routing vector (B, d) to each row."""
    return scale * F.normalize(_normalize(routing), dim=-1) @ F.normalize(rows, dim=-1).T


def top_gates(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Indices (B, k) of the k best unique experts per sample and their softmax weights (B, k)."""
    top, index = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
    return index, torch.softmax(top, dim=-1)


def _folded_mix(normed: Tensor, experts: FoldedAdapters, index: Tensor, weights: Tensor) -> Tensor:
    """The gated sum of the selected folded experts (per sample `index` (B, k), `weights` (B, k)) on every token of
    `normed` (B, N, d): two batched matmuls, the weights folded into the gathered up-projections (as CaRE's level 2)."""
    batch, slots = index.shape
    bottleneck, dim = experts.down_weight.shape[1:]
    down = experts.down_weight[index].reshape(batch, slots * bottleneck, dim)
    down_bias = experts.down_bias[index].reshape(batch, 1, slots * bottleneck)
    hidden = F.relu(torch.baddbmm(down_bias, normed, down.transpose(1, 2)))
    up = (experts.up_weight[index] * weights[:, :, None, None]).reshape(batch, slots * bottleneck, dim)
    up_bias = (experts.up_bias[index] * weights[:, :, None]).sum(dim=1)
    return torch.baddbmm(up_bias[:, None, :], hidden, up)


def _folded_shared(normed: Tensor, shared: FoldedAdapters) -> Tensor:
    flat = normed.reshape(-1, normed.shape[-1])
    hidden = F.relu(torch.addmm(shared.down_bias[0], flat, shared.down_weight[0].T))
    return torch.addmm(shared.up_bias[0], hidden, shared.up_weight[0]).reshape(normed.shape)


def _apply_adapter(stack: AdapterStack, index: int, x: Tensor) -> Tensor:
    """Adapter `index` of a raw stack on x (..., d), as the module computes it in eval mode."""
    normed = F.layer_norm(x, x.shape[-1:], stack.norm_weight[index], stack.norm_bias[index], LAYER_NORM_EPS)
    hidden = F.relu(F.linear(normed, stack.down_weight[index], stack.down_bias[index]))
    return stack.scale[index] * F.linear(hidden, stack.up_weight[index], stack.up_bias[index])


@dataclass
class SetaSite:
    """One site of a SETA version: its shared expert, every task's unique expert and gate row (in task order)."""

    shared: AdapterStack  # count 1
    unique: AdapterStack  # count T
    gates: Tensor  # (T, d), unit rows
    _folded: tuple[FoldedAdapters, FoldedAdapters] | None = field(default=None, repr=False)

    def folded(self) -> tuple[FoldedAdapters, FoldedAdapters]:
        """(shared, unique) in the folded form of the fast path, computed once."""
        if self._folded is None:
            with torch.inference_mode(False), torch.no_grad():
                self._folded = (self.shared.fold(), self.unique.fold())
        return self._folded


def seta_fast(tokens: Tensor, routing: Tensor, site: SetaSite, config: ModelConfig) -> Tensor:
    """The served SETA delta at one site (inference): one normalisation of the tokens, the shared expert as two
    GEMMs, and only the k gated unique experts of each sample. Cost per sample: T d for the gate, flat otherwise."""
    shared, unique = site.folded()
    normed = _normalize(tokens)
    index, weights = top_gates(gate_logits(routing, site.gates, config.seta_gate_scale), config.seta_top_k)
    return _folded_shared(normed, shared) + _folded_mix(normed, unique, index, weights)


def seta_reference(tokens: Tensor, routing: Tensor, site: SetaSite, config: ModelConfig) -> Tensor:
    """The same delta term by term: every unique expert on every token from the raw parameters, weighted by a dense
    gate vector that is zero outside each sample's top k (no folding, no gathers)."""
    count = site.unique.count
    rows = site.gates / site.gates.norm(dim=-1, keepdim=True)
    pooled = _normalize(routing)
    logits = config.seta_gate_scale * (pooled / pooled.norm(dim=-1, keepdim=True)) @ rows.T  # (B, T)
    k = min(config.seta_top_k, count)
    kth = torch.sort(logits, dim=-1, descending=True).values[:, k - 1 : k]
    chosen = logits >= kth
    exps = torch.where(chosen, torch.exp(logits - logits.max(dim=-1, keepdim=True).values), 0.0)
    dense = exps / exps.sum(dim=-1, keepdim=True)  # (B, T)
    delta = _apply_adapter(site.shared, 0, tokens)
    for task in range(count):
        delta = delta + dense[:, task, None, None] * _apply_adapter(site.unique, task, tokens)
    return delta


class SetaBank:
    """Every site of a SETA version. Immutable in use: `append` returns a new bank, `with_shared` swaps the shared
    experts (a new version's), both keeping the unique experts and gate rows of the tasks already there."""

    def __init__(self, sites: Sequence[SetaSite]) -> None:
        counts = {s.unique.count for s in sites} | {int(s.gates.shape[0]) for s in sites}
        if len(counts) > 1:
            raise ValueError(f"sites disagree on the number of tasks: {sorted(counts)}")
        self.sites = list(sites)

    @property
    def num_tasks(self) -> int:
        return self.sites[0].unique.count if self.sites else 0

    def append(self, unique: Sequence[AdapterStack], gates: Sequence[Tensor]) -> SetaBank:
        """A bank with one more task: per site its unique expert (a stack of 1) and gate row (1, d)."""
        return SetaBank(
            [
                SetaSite(s.shared, AdapterStack.concat([s.unique, u]), torch.cat([s.gates, F.normalize(g, dim=-1)]))
                for s, u, g in zip(self.sites, unique, gates, strict=True)
            ]
        )

    def with_shared(self, shared: Sequence[AdapterStack]) -> SetaBank:
        return SetaBank([SetaSite(sh, s.unique, s.gates) for s, sh in zip(self.sites, shared, strict=True)])

    @classmethod
    def start(cls, shared: Sequence[AdapterStack], expert_dim: int) -> SetaBank:
        """A bank of no task around `shared` (per site, a stack of 1)."""
        return cls(
            [
                SetaSite(
                    sh,
                    AdapterStack.empty(sh.norm_weight.shape[1], expert_dim).to(sh.norm_weight.device),
                    sh.norm_weight.new_empty(0, sh.norm_weight.shape[1]),
                )
                for sh in shared
            ]
        )

    def prepare_fast_path(self) -> None:
        """Fold every site's experts now, off the request path (a version is swapped in ready to serve)."""
        for site in self.sites:
            site.folded()

    def to(self, device: torch.device | str) -> SetaBank:
        return SetaBank([SetaSite(s.shared.to(device), s.unique.to(device), s.gates.to(device)) for s in self.sites])

    def detach(self) -> SetaBank:
        return SetaBank([SetaSite(s.shared.detach(), s.unique.detach(), s.gates.detach()) for s in self.sites])


class SetaModel(ServedHead):
    """A frozen backbone, the SETA bank of a version and its served head; immutable (a `ServedNetwork`).

    Args:
        config: Model configuration (method "seta").
        backbone: The frozen, site-cut backbone.
        bank: Shared experts, unique experts and gate rows.
        classifier: (C, D) cosine classifier rows (the training-time head).
        head: The served analytic head; None serves the cosine classifier (tests, and training's first step).
    """

    def __init__(
        self,
        config: ModelConfig,
        backbone: SiteBackbone,
        bank: SetaBank,
        classifier: Tensor,
        head: AnalyticHead | None = None,
    ) -> None:
        if config.method != "seta":
            raise ValueError(f"a SetaModel needs method 'seta', the configuration has {config.method!r}")
        if len(bank.sites) != backbone.num_sites:
            raise ValueError(f"bank has {len(bank.sites)} sites, backbone {backbone.num_sites}")
        self.config = config
        self.backbone = backbone
        self.bank = bank
        self.classifier = classifier
        self.head = head

    @property
    def num_tasks(self) -> int:
        return self.bank.num_tasks

    def _site_fn(self, path: SetaPath) -> Callable[[int], SiteFn]:
        def for_site(index: int) -> SiteFn:
            site = self.bank.sites[index]
            run = seta_reference if path == "reference" else seta_fast
            return lambda tokens, routing: run(tokens, routing, site, self.config)

        return for_site

    @torch.inference_mode()
    def features_and_site_vectors(self, hidden: Tensor, path: SetaPath = "fast") -> tuple[Tensor, list[Tensor]]:
        """phi (B, D) and every site's routing vector, from `backbone.embed` output."""
        if self.num_tasks == 0:
            raise ValueError("no task has been learned yet")
        vectors: list[Tensor] = []
        return run_sites(self.backbone, hidden, self._site_fn(path), vectors), vectors

    def head_inputs_from_embedding(
        self, hidden: Tensor, routers: RouterSource | None = None, path: SetaPath = "fast"
    ) -> Tensor:
        """What the served head reads (`routers` is ignored: SETA's gate is resident, part of the bank)."""
        del routers
        features, vectors = self.features_and_site_vectors(hidden, path)
        return features if self.head is None else head_inputs(features, vectors)

    @torch.inference_mode()
    def logits(self, images: Tensor, routers: RouterSource | None = None, path: SetaPath = "fast") -> Tensor:
        return self.scores(self.head_inputs_from_embedding(self.backbone.embed(images), routers, path))

    @torch.inference_mode()
    def predict_proba(self, images: Tensor, routers: RouterSource | None = None, path: SetaPath = "fast") -> Tensor:
        return self.probabilities(self.head_inputs_from_embedding(self.backbone.embed(images), routers, path))


# ---- learning -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetaLineage:
    """What learning the next SETA task needs: the version's bank, cosine rows, head state and anchor importance."""

    bank: SetaBank | None
    classifier: Tensor
    head_statistics: HeadStatistics | None = None
    head: AnalyticHead | None = None
    importance: list[AdapterStack] | None = None  # Omega per site, shaped like the shared experts

    @property
    def num_tasks(self) -> int:
        return 0 if self.bank is None else self.bank.num_tasks

    @classmethod
    def empty(cls, feature_dim: int) -> SetaLineage:
        return cls(None, torch.empty(0, feature_dim))


@dataclass(frozen=True)
class SetaTask:
    """The outcome of `learn_seta_task`: the task's unique experts and gate rows, and the lineage-wide state after
    it (shared experts, importance, classifier, head)."""

    index: int
    unique: list[AdapterStack]  # per site, a stack of 1
    gates: list[Tensor]  # per site, (1, d) unit row
    shared: list[AdapterStack]  # per site, a stack of 1: the shared experts after this task
    importance: list[AdapterStack]  # per site: Omega after this task
    classifier: Tensor
    head: AnalyticHead | None
    head_statistics: HeadStatistics | None
    metrics: dict[str, float] = field(default_factory=dict)


def bank_after(bank: SetaBank | None, learned: SetaTask, expert_dim: int) -> SetaBank:
    """The bank a version serves after `learned`: its shared experts, every earlier task, and the new one."""
    base = SetaBank.start(learned.shared, expert_dim) if bank is None else bank.with_shared(learned.shared)
    return base.append(learned.unique, learned.gates)


def advance_seta(lineage: SetaLineage, learned: SetaTask, expert_dim: int) -> SetaLineage:
    return SetaLineage(
        bank_after(lineage.bank, learned, expert_dim),
        learned.classifier,
        learned.head_statistics,
        learned.head,
        learned.importance,
    )


def _detached_stack(adapter: Adapter) -> AdapterStack:
    stack = AdapterStack.from_modules([adapter])
    return AdapterStack(**{name: tensor.detach().clone() for name, tensor in vars(stack).items()})


def _load_adapter(adapter: Adapter, stack: AdapterStack) -> None:
    with torch.no_grad():
        for name, value in zip(_STACK_FIELDS, _ordered(adapter), strict=True):
            value.copy_(getattr(stack, name)[0])


def _normalized(importance: Sequence[AdapterStack]) -> list[AdapterStack]:
    """Omega divided by its mean over every shared parameter of every site (computed once per task)."""
    total = sum(float(t.sum()) for omega in importance for t in vars(omega).values())
    count = sum(t.numel() for omega in importance for t in vars(omega).values())
    mean = max(total / max(count, 1), 1e-30)
    return [AdapterStack(**{name: t / mean for name, t in vars(omega).items()}) for omega in importance]


def _pull_to_anchor(
    shared: Sequence[Adapter], anchor: Sequence[AdapterStack], weights: Sequence[AdapterStack], rate: float
) -> None:
    """The proximal step of rate/2 * sum_j w_j (theta_j - theta*_j)^2 (w = Omega normalised to mean 1): every shared
    parameter moves back towards the anchor by the factor 1 / (1 + rate w_j), stable for any rate."""
    with torch.no_grad():
        for adapter, theta, weight in zip(shared, anchor, weights, strict=True):
            for name, value in zip(_STACK_FIELDS, _ordered(adapter), strict=True):
                target = getattr(theta, name)[0]
                shrink = 1.0 / (1.0 + rate * getattr(weight, name)[0])
                value.copy_(target + (value - target) * shrink)


def learn_seta_task(
    backbone: SiteBackbone,
    config: ModelConfig,
    train: TrainConfig,
    lineage: SetaLineage,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    progress: ProgressFn | None = None,
) -> SetaTask:
    """Learn one SETA task of `num_classes` new classes from preprocessed images (N, 3, H, W), labels 0..n-1."""
    hidden = embed_images(backbone, images.to(lineage.classifier.device))
    return learn_seta_task_embedded(backbone, config, train, lineage, hidden, labels, num_classes, progress)


class _SetaTrainer:
    """State of one `learn_seta_task_embedded` call."""

    def __init__(self, backbone: SiteBackbone, config: ModelConfig, lineage: SetaLineage, num_classes: int) -> None:
        self.backbone, self.config, self.lineage = backbone, config, lineage
        device = lineage.classifier.device
        dims = list(backbone.site_dims)
        self.unique = [Adapter(d, config.expert_dim, 0.0).to(device) for d in dims]
        self.shared = adapters(shared_experts(dims, config.shared_dim, 0.0).to(device))
        if lineage.bank is not None:
            for adapter, site in zip(self.shared, lineage.bank.sites, strict=True):
                _load_adapter(adapter, site.shared)
        self.gates = nn.ParameterList(nn.Parameter(torch.zeros(1, d, device=device)) for d in dims)
        self.block = nn.Parameter(torch.empty(num_classes, backbone.feature_dim, device=device))
        nn.init.trunc_normal_(self.block, std=0.02)
        with torch.no_grad():
            self.block.copy_(F.normalize(self.block, dim=1))  # unit rows, as CaRE's trainer
        self.gate_losses: list[Tensor] = []

    def init_gates(self, hidden: Tensor) -> None:
        """Each gate row starts at the mean normalised routing vector of the task's images, as the sites see them
        with the shared experts and the earlier tasks' gated experts (the new expert still adds nothing)."""
        sums: list[Tensor] = [torch.zeros_like(g[0]) for g in self.gates]

        def site_fn(site: int) -> SiteFn:
            def run(tokens: Tensor, routing: Tensor) -> Tensor:
                sums[site] += F.normalize(_normalize(routing), dim=-1).sum(dim=0)
                return self._delta(site, tokens, routing, record=False)

            return run

        with torch.no_grad():
            for start in range(0, len(hidden), EMBED_CHUNK):
                run_sites(self.backbone, hidden[start : start + EMBED_CHUNK], site_fn)
            for gate, total in zip(self.gates, sums, strict=True):
                gate.copy_(F.normalize(total, dim=0)[None])

    def _delta(self, site: int, tokens: Tensor, routing: Tensor, record: bool = True) -> Tensor:
        """Training forward of one site: shared + the new task's expert gated with the k - 1 best earlier ones."""
        index = self.lineage.num_tasks
        old = None if self.lineage.bank is None else self.lineage.bank.sites[site]
        rows = self.gates[site] if old is None else torch.cat([old.gates, self.gates[site]])
        logits = gate_logits(routing, rows, self.config.seta_gate_scale)  # (B, T + 1)
        if record:
            target = torch.full((len(routing),), index, dtype=torch.long, device=routing.device)
            self.gate_losses.append(F.cross_entropy(logits, target))
        new_logit = logits[:, index : index + 1]
        delta: Tensor = self.shared[site](tokens)
        own: Tensor = self.unique[site](tokens)
        if old is None or self.config.seta_top_k < 2:
            return delta + own
        old_index, _ = top_gates(logits[:, :index], self.config.seta_top_k - 1)  # (B, k - 1)
        weights = torch.softmax(torch.cat([new_logit, logits.gather(1, old_index)], dim=1), dim=-1)
        _, old_unique = old.folded()
        normed = _normalize(tokens)
        mixed = _folded_mix(normed, old_unique, old_index, weights[:, 1:])
        return delta + weights[:, :1, None] * own + mixed

    def site_fn(self, site: int) -> SiteFn:
        return lambda tokens, routing: self._delta(site, tokens, routing)

    def parameters(self) -> list[dict[str, object]]:
        return [
            {"params": [p for a in self.unique for p in a.parameters()] + list(self.gates.parameters())},
            {"params": [p for a in self.shared for p in a.parameters()]},
            {"params": [self.block]},
        ]


def learn_seta_task_embedded(
    backbone: SiteBackbone,
    config: ModelConfig,
    train: TrainConfig,
    lineage: SetaLineage,
    hidden: Tensor,
    labels: Tensor,
    num_classes: int,
    progress: ProgressFn | None = None,
) -> SetaTask:
    """`learn_seta_task` from `embed_images` output.

    CaRE's trainer loop without what SETA has no use for (model/trainer.py): SGD with momentum and a per-epoch
    cosine schedule over `TrainConfig`'s epochs (at least `min_steps` steps), CE on scaled cosine logits of the new
    classes (against the fixed rows of every earlier class with `old_class_negatives`), plus the gate's CE towards
    the task's own expert averaged over sites, plus the anchor on the shared experts from the second task on. After
    training, Omega grows by this task's Fisher and the analytic head takes the task's served features.
    """
    if config.method != "seta":
        raise ValueError(f"learn_seta_task needs method 'seta', the configuration has {config.method!r}")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes or len(labels) != len(hidden):
        raise ValueError(f"need one label in 0..{num_classes - 1} per image, got {len(labels)} for {len(hidden)}")
    started = time.perf_counter()
    device = lineage.classifier.device
    old_classifier = lineage.classifier
    hidden, labels = hidden.to(device), labels.to(device)
    generator = torch.Generator().manual_seed(train.seed)
    anchor = None if lineage.bank is None else [site.shared for site in lineage.bank.sites]
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(train.seed)
        trainer = _SetaTrainer(backbone, config, lineage, num_classes)
        for adapter in trainer.unique:
            with torch.no_grad():
                adapter.scale.fill_(train.expert_scale_init)
        trainer.init_gates(hidden)

        def task_loss(rows: Tensor) -> Tensor:
            trainer.gate_losses.clear()
            features = run_sites(backbone, hidden[rows], trainer.site_fn)
            return new_class_loss(features, trainer.block, old_classifier, labels[rows], config.cosine_scale, train)

        def with_gate_loss(rows: Tensor) -> Tensor:
            return task_loss(rows) + torch.stack(trainer.gate_losses).mean()

        weights = None if lineage.importance is None else _normalized(lineage.importance)

        def anchor_step(lr: float) -> None:
            if anchor is not None and weights is not None:
                _pull_to_anchor(trainer.shared, anchor, weights, 2 * lr * config.seta_anchor)

        optimizer = torch.optim.SGD(
            trainer.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
        epoch_losses = sgd_epochs(optimizer, with_gate_loss, len(hidden), train, generator, progress, anchor_step)
        fisher = _fisher(trainer, task_loss, len(hidden), train.batch_size)
    importance = (
        fisher if lineage.importance is None else [_add(a, b) for a, b in zip(lineage.importance, fisher, strict=True)]
    )
    unique = [_detached_stack(a) for a in trainer.unique]
    gates = [F.normalize(g.detach().clone(), dim=-1) for g in trainer.gates]
    shared = [_detached_stack(a) for a in trainer.shared]
    classifier = torch.cat([old_classifier, trainer.block.detach()])
    learned = SetaTask(lineage.num_tasks, unique, gates, shared, importance, classifier, None, None)
    bank = bank_after(lineage.bank, learned, config.expert_dim)
    inputs = served_seta_inputs(backbone, config, bank, classifier, hidden)
    offset = old_classifier.shape[0]
    head, head_statistics = extend_analytic_head(
        lineage.head, lineage.head_statistics, backbone, train, inputs, labels, num_classes, offset
    )
    with torch.no_grad():
        accuracy = float((head.scores(inputs).argmax(dim=1) == labels + offset).float().mean())
    drift = 0.0 if anchor is None else _relative_change(anchor, shared)
    metrics = {
        "first_loss": epoch_losses[0],
        "final_loss": epoch_losses[-1],
        "train_accuracy": accuracy,
        "epochs": float(len(epoch_losses)),
        "shared_drift": drift,
        "shared_scale": float(torch.stack([stack.scale.abs().mean() for stack in shared]).mean()),
        "seconds": time.perf_counter() - started,
    }
    return SetaTask(learned.index, unique, gates, shared, importance, classifier, head, head_statistics, metrics)


def _fisher(trainer: _SetaTrainer, task_loss: Callable[[Tensor], Tensor], count: int, batch: int) -> list[AdapterStack]:
    """The diagonal empirical Fisher of the task's CE w.r.t. the shared experts: mean squared mini-batch gradient."""
    sums = [
        AdapterStack(**{k: torch.zeros_like(v) for k, v in vars(_detached_stack(a)).items()}) for a in trainer.shared
    ]
    steps = math.ceil(count / batch)
    for step in range(steps):
        rows = torch.arange(step * batch, min((step + 1) * batch, count), device=trainer.block.device)
        loss = task_loss(rows)
        params = [p for a in trainer.shared for p in _ordered(a)]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        per_site = len(params) // len(trainer.shared)
        for site, total in enumerate(sums):
            site_grads = grads[site * per_site : (site + 1) * per_site]
            for name, grad in zip(_STACK_FIELDS, site_grads, strict=True):
                if grad is not None:
                    getattr(total, name).add_(grad.detach()[None] ** 2 / steps)
    return sums


_STACK_FIELDS = tuple(f.name for f in dataclasses.fields(AdapterStack))


def _ordered(adapter: Adapter) -> list[Tensor]:
    """An adapter's parameters in `AdapterStack` field order."""
    return [
        adapter.norm.weight,
        adapter.norm.bias,
        adapter.down.weight,
        adapter.down.bias,
        adapter.up.weight,
        adapter.up.bias,
        adapter.scale,
    ]


def _add(a: AdapterStack, b: AdapterStack) -> AdapterStack:
    return AdapterStack(**{name: getattr(a, name) + getattr(b, name) for name in _STACK_FIELDS})


def _relative_change(before: Sequence[AdapterStack], after: Sequence[AdapterStack]) -> float:
    """||theta - theta*|| / ||theta*|| over every shared parameter: how far the anchor let the shared experts move."""
    diff = sum(
        float(((getattr(b, n) - getattr(a, n)) ** 2).sum())
        for a, b in zip(before, after, strict=True)
        for n in _STACK_FIELDS
    )
    base = sum(float((getattr(a, n) ** 2).sum()) for a in before for n in _STACK_FIELDS)
    return math.sqrt(diff / max(base, 1e-30))


def served_seta_inputs(
    backbone: SiteBackbone, config: ModelConfig, bank: SetaBank, classifier: Tensor, hidden: Tensor
) -> Tensor:
    """The analytic head's (unscaled) inputs of `embed_images` output as the version holding `bank` serves them."""
    model = SetaModel(config, backbone, bank, classifier)
    return torch.cat(
        [
            head_inputs(*model.features_and_site_vectors(hidden[i : i + EMBED_CHUNK]))
            for i in range(0, len(hidden), EMBED_CHUNK)
        ]
    ).clone()
