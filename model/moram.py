"""MoRAM at care-serve's sites: rank-one associative-memory atoms that decide their own relevance, no router.

MoRAM ("Little by Little", arXiv 2506.21035, ICML 2026; official code Artificer-AI-Lab/MoRAM) gives a frozen
linear layer a growing bank of rank-one atoms: atom i is a key a_i and a value b_i, and every task appends r new
atoms and freezes the earlier ones. For a token x, with z = A x the raw key responses of every atom of the site
(all tasks), the code computes

    s = z / ||z||_2                               scores, normalised across every atom of the site
    w = softmax(TopK(s, k) / tau)                 k = max(top_k, 2); atoms outside the top-k get weight 0
    w = w * [s >= delta]                          at evaluation only, and without renormalising
    delta_y = sum_i w_i z_i b_i                   the value mixes the *raw* responses

What is adapted here (see /work/shared/reference/seta-mora.md, section 3.3):

* Placement: one bank per care-serve site, in parallel to the block (the same `SiteFn` slot as CaRE's BR-MoE),
  reading the site's tokens through a LayerNorm without affine parameters, d_in = d_out = the site width. The
  paper places banks inside q, k, v, out, fc1 and fc2 of CLIP's linears instead; no result exists for this form.
* Head: the task's new classes train a cosine classifier block with CE (as CaRE's main loss, MoRAM's "-inf on old
  classes" objective); the served head is the analytic head, solved from the served features like CaRE's.
* Initialisation as the code: keys kaiming_uniform(a=sqrt(5)), values zero, scaling 1, no dropout.

Two forward forms, switched by `ModelConfig.moram_candidates`:

* faithful (0): every token scores every atom of every task, as published. The key side costs R d per token,
  R = r T, so it grows linearly with the number of tasks (the value side is a dense R x d matmul, as the code's).
* bounded (n > 0, ours, not the paper's): each sample first scores every atom on its routing vector (CLS token or
  spatial mean; R d once per sample, like CaRE's CLS pre-pass) and keeps its n best atoms as candidates; its tokens
  then score only those. The L2 normalisation stays exact over *all* atoms through the site's Gram matrix
  (||A x||^2 = x^T (A^T A) x, d^2 per token), so a token whose faithful top-k lies inside its candidates gets
  exactly the faithful output. Per-token cost: d^2 + 2 n d, flat in T.

`moram_reference` computes either form term by term, looping over atoms, for the exactness tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.adapter import LAYER_NORM_EPS
from model.backbone import SiteBackbone, SiteFn
from model.config import ModelConfig, TrainConfig
from model.head import AnalyticHead, HeadStatistics, head_inputs
from model.loop import new_class_loss, sgd_epochs
from model.network import ServedHead, run_sites
from model.routers import RouterSource
from model.trainer import EMBED_CHUNK, ProgressFn, embed_images, extend_analytic_head

NORM_EPS = 1e-12  # F.normalize's default, the code's guard for tokens whose responses are all ~0

MoramPath = Literal["fast", "reference"]

# The atoms' learning rate as a multiple of `TrainConfig.lr` (the classifier rows keep 1). At 1 the atoms barely
# move (one 2-class digits task on EfficientNet-Lite0, r = 8: phi changes by 0.6 %, the task's training CE with
# the atoms is 0.132 against 0.135 with their values zeroed); 5 / 10 / 20 give 0.123 / 0.111 / 0.118 against
# 0.133 / 0.139 / 0.127, and 50 diverges. 10 made MoRAM collapse on fmnist5 (last accuracy 20.6 %, forgetting 96):
# the keys hardly move under SGD, so no atom is selective, every task's values act on every image, and an earlier
# class's served features drift away from the statistics the analytic head holds for it (the same atoms with every
# class's statistics recomputed reach 83.6 %). At 1: 84.1 %, forgetting 8.3 (docs/benchmarks.md, MoRAM section).
# The code trains them with AdamW at 5e-4 for 500 iterations instead (here: 79.3 %, forgetting 17; at 1e-4: 84.2).
ATOM_LR_SCALE = 1.0


@dataclass(frozen=True)
class AtomStack:
    """Rank-one atoms of one site, stacked: atom i adds `(keys[i] . xhat) * values[i]` (before gating)."""

    keys: Tensor  # (R, d_in): a_i, the rows of the code's lora_A
    values: Tensor  # (R, d_out): b_i, the columns of the code's lora_B

    @property
    def count(self) -> int:
        return int(self.keys.shape[0])

    @classmethod
    def concat(cls, stacks: Sequence[AtomStack]) -> AtomStack:
        if len(stacks) == 1:
            return stacks[0]
        return cls(torch.cat([s.keys for s in stacks]), torch.cat([s.values for s in stacks]))

    @classmethod
    def empty(cls, dim: int) -> AtomStack:
        return cls(torch.empty(0, dim), torch.empty(0, dim))

    def to(self, device: torch.device | str) -> AtomStack:
        return AtomStack(self.keys.to(device), self.values.to(device))

    def detach(self) -> AtomStack:
        return AtomStack(self.keys.detach(), self.values.detach())


@dataclass(frozen=True)
class MoramOptions:
    """How one forward pass gates the atoms.

    Attributes:
        top_k: The code's topk; k = max(top_k, 2), at most the atoms scored.
        temperature: tau.
        threshold: delta; applied only when `evaluate` (the code: `not self.training`); 0 disables it.
        candidates: 0 = faithful; n > 0 = bounded to n atoms per sample (see the module docstring).
        evaluate: Inference (threshold on) rather than training.
    """

    top_k: int
    temperature: float
    threshold: float
    candidates: int = 0
    evaluate: bool = True

    @classmethod
    def from_config(cls, config: ModelConfig, evaluate: bool = True, candidates: int | None = None) -> MoramOptions:
        return cls(
            top_k=config.moram_top_k,
            temperature=config.moram_temperature,
            threshold=config.moram_threshold,
            candidates=config.moram_candidates if candidates is None else candidates,
            evaluate=evaluate,
        )

    def bounded(self, atoms: int) -> bool:
        """Whether the bounded form differs from the faithful one for a site of `atoms` atoms."""
        return 0 < self.candidates < atoms


def _normalize_tokens(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)


def _active(options: MoramOptions, scored: int) -> int:
    return min(max(options.top_k, 2), scored)


def _mix(responses: Tensor, scores: Tensor, values: Tensor, options: MoramOptions) -> Tensor:
    """Gate scored atoms and mix their values: responses and scores (..., R'), values (R', d) or (B, R', d)."""
    top, index = torch.topk(scores, _active(options, scores.shape[-1]), dim=-1)
    weights = torch.softmax(top / options.temperature, dim=-1)
    if options.evaluate and options.threshold > 0:
        weights = weights * (top >= options.threshold)
    coefficients = torch.zeros_like(responses).scatter(-1, index, weights * responses.gather(-1, index))
    return torch.matmul(coefficients, values)


def moram_faithful(tokens: Tensor, atoms: AtomStack, options: MoramOptions) -> Tensor:
    """The published form: every token (B, N, d) scores every atom. Returns the delta (B, N, d_out)."""
    x = _normalize_tokens(tokens)
    responses = x @ atoms.keys.T  # (B, N, R)
    scores = F.normalize(responses, dim=-1, eps=NORM_EPS)
    return _mix(responses, scores, atoms.values, options)


def candidate_atoms(routing: Tensor, keys: Tensor, count: int) -> Tensor:
    """(B, count) indices of the atoms each sample's routing vector (B, d) responds to most (signed, as top-k)."""
    return torch.topk(_normalize_tokens(routing) @ keys.T, count, dim=-1).indices


def moram_bounded(tokens: Tensor, routing: Tensor, atoms: AtomStack, options: MoramOptions, gram: Tensor) -> Tensor:
    """The bounded form (inference): tokens score only their sample's candidate atoms.

    Args:
        tokens: (B, N, d) the site's input.
        routing: (B, d) its routing vector (CLS token or spatial mean).
        atoms: Every atom of the site.
        options: Gating options; `candidates` is n.
        gram: (d, d) `keys^T keys`, for the exact normalisation over every atom.
    """
    if not options.bounded(atoms.count):
        return moram_faithful(tokens, atoms, options)
    x = _normalize_tokens(tokens)
    chosen = candidate_atoms(routing, atoms.keys, options.candidates)  # (B, n)
    responses = torch.bmm(x, atoms.keys[chosen].transpose(1, 2))  # (B, N, n)
    norm = torch.linalg.vecdot(x @ gram, x).clamp_min(0.0).sqrt().clamp_min(NORM_EPS)  # ||A x|| over all atoms
    return _mix(responses, responses / norm[..., None], atoms.values[chosen], options)


def moram_reference(tokens: Tensor, routing: Tensor, atoms: AtomStack, options: MoramOptions) -> Tensor:
    """Either form term by term (inference): a loop over atoms, no Gram matrix, no gathers or scatters."""
    x = _normalize_tokens(tokens)
    count = atoms.count
    responses = [x @ atoms.keys[i] for i in range(count)]  # each (B, N)
    norm = torch.sqrt(sum((r * r for r in responses), torch.zeros_like(responses[0]))).clamp_min(NORM_EPS)
    allowed = torch.ones(x.shape[0], count, dtype=torch.bool, device=x.device)
    if options.bounded(count):
        pre = _normalize_tokens(routing)
        routed = torch.stack([pre @ atoms.keys[i] for i in range(count)], dim=1)  # (B, R)
        allowed = torch.zeros_like(allowed)
        for sample in range(x.shape[0]):
            row = routed[sample].tolist()
            ranked = sorted(range(count), key=row.__getitem__, reverse=True)
            allowed[sample, ranked[: options.candidates]] = True
    scores = torch.stack([r / norm for r in responses], dim=-1)  # (B, N, R)
    eligible = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    active = _active(options, options.candidates if options.bounded(count) else count)
    ranked_scores = torch.sort(eligible, dim=-1, descending=True).values
    best, kth = ranked_scores[..., 0], ranked_scores[..., active - 1 : active]
    chosen = eligible >= kth  # the top-k atoms of each token
    exps = [
        torch.where(chosen[..., i], torch.exp((scores[..., i] - best) / options.temperature), 0.0) for i in range(count)
    ]
    total = sum(exps, torch.zeros_like(norm))
    delta = torch.zeros(*x.shape[:2], atoms.values.shape[1], dtype=x.dtype, device=x.device)
    for i in range(count):
        weight = exps[i] / total
        if options.evaluate and options.threshold > 0:
            weight = weight * (scores[..., i] >= options.threshold)
        delta = delta + (weight * responses[i])[..., None] * atoms.values[i]
    return delta


class SiteAtoms:
    """The frozen atoms of one site, with the Gram matrix of their keys computed once (for the bounded form)."""

    def __init__(self, atoms: AtomStack) -> None:
        self.atoms = atoms
        self._gram: Tensor | None = None

    def gram(self) -> Tensor:
        if self._gram is None:
            with torch.inference_mode(False), torch.no_grad():
                keys = self.atoms.keys.double()
                self._gram = (keys.T @ keys).to(self.atoms.keys.dtype)
        return self._gram


class AtomBank:
    """Every learned task's atoms, per site, in task order. Immutable: `append` returns a new bank.

    Every atom takes part in every token's normalisation and top-k, so the bank's order and content are the served
    behaviour of every task: evicting one task's atoms changes all outputs (the reference, section 3.3).
    """

    def __init__(self, sites: Sequence[AtomStack], rank: int) -> None:
        counts = {s.count for s in sites}
        if len(counts) > 1:
            raise ValueError(f"sites disagree on the number of atoms: {sorted(counts)}")
        if counts and next(iter(counts)) % rank:
            raise ValueError(f"{next(iter(counts))} atoms per site is not a whole number of tasks of rank {rank}")
        self.sites = [SiteAtoms(s) for s in sites]
        self.rank = rank

    @property
    def num_tasks(self) -> int:
        return self.sites[0].atoms.count // self.rank if self.sites else 0

    @property
    def num_atoms(self) -> int:
        return self.sites[0].atoms.count if self.sites else 0

    def append(self, task: Sequence[AtomStack]) -> AtomBank:
        """A new bank with one more task (its r atoms per site)."""
        if any(s.count != self.rank for s in task):
            raise ValueError(f"a task adds {self.rank} atoms per site, got {[s.count for s in task]}")
        return AtomBank([AtomStack.concat([s.atoms, t]) for s, t in zip(self.sites, task, strict=True)], self.rank)

    @classmethod
    def of_tasks(cls, tasks: Sequence[Sequence[AtomStack]], rank: int) -> AtomBank:
        """A bank of several tasks' atoms (per task, per site) at once."""
        if not tasks:
            raise ValueError("a bank needs at least one task")
        return cls([AtomStack.concat(list(per_site)) for per_site in zip(*tasks, strict=True)], rank)

    def prepare_fast_path(self) -> None:
        for site in self.sites:
            site.gram()

    def to(self, device: torch.device | str) -> AtomBank:
        return AtomBank([s.atoms.to(device) for s in self.sites], self.rank)


def site_functions(bank: AtomBank, options: MoramOptions, path: MoramPath = "fast") -> Callable[[int], SiteFn]:
    """The per-site delta functions `run_sites` calls: faithful, bounded or reference, as the options say."""

    def for_site(site: int) -> SiteFn:
        entry = bank.sites[site]
        atoms = entry.atoms
        if path == "reference":
            return lambda tokens, routing: moram_reference(tokens, routing, atoms, options)
        if options.bounded(atoms.count):
            gram = entry.gram()
            return lambda tokens, routing: moram_bounded(tokens, routing, atoms, options, gram)
        return lambda tokens, _routing: moram_faithful(tokens, atoms, options)

    return for_site


class MoramModel(ServedHead):
    """A frozen backbone, the atom bank of the learned tasks and the served head; immutable.

    Args:
        config: Model configuration (method "moram").
        backbone: The frozen, site-cut backbone.
        bank: The atoms of every learned task.
        classifier: (C, D) cosine classifier rows of every learned class (training-time head).
        head: The served analytic head; None serves the cosine classifier (tests and the first step of training).
    """

    def __init__(
        self,
        config: ModelConfig,
        backbone: SiteBackbone,
        bank: AtomBank,
        classifier: Tensor,
        head: AnalyticHead | None = None,
    ) -> None:
        if config.method != "moram":
            raise ValueError(f"a MoramModel needs method 'moram', the configuration has {config.method!r}")
        if len(bank.sites) != backbone.num_sites:
            raise ValueError(f"bank has {len(bank.sites)} sites, backbone {backbone.num_sites}")
        if bank.rank != config.moram_rank:
            raise ValueError(f"bank has rank {bank.rank}, the configuration {config.moram_rank}")
        self.config = config
        self.backbone = backbone
        self.bank = bank
        self.classifier = classifier
        self.head = head

    @property
    def num_tasks(self) -> int:
        return self.bank.num_tasks

    @torch.inference_mode()
    def features_and_site_vectors(
        self, hidden: Tensor, path: MoramPath = "fast", candidates: int | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """phi (B, D) and every site's routing vector, from `backbone.embed` output; `candidates` overrides the
        configuration's (0: faithful)."""
        if self.num_tasks == 0:
            raise ValueError("no task has been learned yet")
        options = MoramOptions.from_config(self.config, evaluate=True, candidates=candidates)
        vectors: list[Tensor] = []
        features = run_sites(self.backbone, hidden, site_functions(self.bank, options, path), vectors)
        return features, vectors

    def head_inputs_from_embedding(
        self,
        hidden: Tensor,
        routers: RouterSource | None = None,
        path: MoramPath = "fast",
        candidates: int | None = None,
    ) -> Tensor:
        """What the served head reads: the analytic head's inputs, or phi for the cosine classifier.

        `routers` is ignored (MoRAM has none): it is accepted so that a MoramModel answers the calls the service
        makes of a `CareModel` (`service.modelstore.ServedNetwork`)."""
        del routers
        features, vectors = self.features_and_site_vectors(hidden, path, candidates)
        return features if self.head is None else head_inputs(features, vectors)

    @torch.inference_mode()
    def logits(
        self,
        images: Tensor,
        routers: RouterSource | None = None,
        path: MoramPath = "fast",
        candidates: int | None = None,
    ) -> Tensor:
        """Scores (B, C) over all learned classes of preprocessed images, without a task id (`routers`: ignored)."""
        hidden = self.backbone.embed(images)
        return self.scores(self.head_inputs_from_embedding(hidden, routers, path=path, candidates=candidates))

    @torch.inference_mode()
    def predict_proba(
        self,
        images: Tensor,
        routers: RouterSource | None = None,
        path: MoramPath = "fast",
        candidates: int | None = None,
    ) -> Tensor:
        """Probabilities (B, C) over all learned classes (`routers`: ignored)."""
        hidden = self.backbone.embed(images)
        return self.probabilities(self.head_inputs_from_embedding(hidden, routers, path=path, candidates=candidates))


# ---- learning -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoramLineage:
    """What learning the next MoRAM task needs: the atoms so far, the cosine rows and the analytic head's state."""

    bank: AtomBank | None
    classifier: Tensor
    head_statistics: HeadStatistics | None = None
    head: AnalyticHead | None = None

    @property
    def num_tasks(self) -> int:
        return 0 if self.bank is None else self.bank.num_tasks

    @classmethod
    def empty(cls, feature_dim: int) -> MoramLineage:
        return cls(None, torch.empty(0, feature_dim))


@dataclass(frozen=True)
class MoramTask:
    """The outcome of `learn_moram_task`: the task's atoms per site and the lineage-wide tensors that changed."""

    index: int
    atoms: list[AtomStack]  # per site, moram_rank atoms
    classifier: Tensor  # (C + n_T, D)
    head: AnalyticHead | None
    head_statistics: HeadStatistics | None
    metrics: dict[str, float] = field(default_factory=dict)


def bank_with(bank: AtomBank | None, atoms: Sequence[AtomStack], rank: int) -> AtomBank:
    return AtomBank(list(atoms), rank) if bank is None else bank.append(atoms)


def advance_moram(lineage: MoramLineage, learned: MoramTask, rank: int) -> MoramLineage:
    """The lineage after `learned`."""
    return MoramLineage(
        bank_with(lineage.bank, learned.atoms, rank), learned.classifier, learned.head_statistics, learned.head
    )


def new_atoms(dim: int, rank: int, device: torch.device | str) -> tuple[nn.Parameter, nn.Parameter]:
    """A new task's trainable atoms at one site, initialised as the code: keys kaiming_uniform(a=sqrt(5)), values 0."""
    keys = nn.Parameter(torch.empty(rank, dim, device=device))
    nn.init.kaiming_uniform_(keys, a=math.sqrt(5))
    return keys, nn.Parameter(torch.zeros(rank, dim, device=device))


def learn_moram_task(
    backbone: SiteBackbone,
    config: ModelConfig,
    train: TrainConfig,
    lineage: MoramLineage,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    progress: ProgressFn | None = None,
) -> MoramTask:
    """Learn one MoRAM task of `num_classes` new classes from preprocessed images (N, 3, H, W), labels 0..n-1."""
    hidden = embed_images(backbone, images.to(lineage.classifier.device))
    return learn_moram_task_embedded(backbone, config, train, lineage, hidden, labels, num_classes, progress)


def learn_moram_task_embedded(
    backbone: SiteBackbone,
    config: ModelConfig,
    train: TrainConfig,
    lineage: MoramLineage,
    hidden: Tensor,
    labels: Tensor,
    num_classes: int,
    progress: ProgressFn | None = None,
) -> MoramTask:
    """`learn_moram_task` from `embed_images` output.

    The trainer loop of CaRE's trainer (model/trainer.py) without what MoRAM has no use for: SGD with momentum and
    a per-epoch cosine schedule over `TrainConfig`'s epochs (at least `min_steps` steps), CE on scaled cosine logits
    of the new classes (against the fixed rows of every earlier class too with `old_class_negatives`); no
    perceptrons, no routers, no second stage (there is no classifier alignment: the served head is the analytic
    one, solved afterwards from the served features). Only the new atoms and the new classifier rows train; every
    earlier atom is frozen but takes part in the normalisation and top-k, as in the code.
    """
    if config.method != "moram":
        raise ValueError(f"learn_moram_task needs method 'moram', the configuration has {config.method!r}")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes or len(labels) != len(hidden):
        raise ValueError(f"need one label in 0..{num_classes - 1} per image, got {len(labels)} for {len(hidden)}")
    started = time.perf_counter()
    device = lineage.classifier.device
    rank = config.moram_rank
    index = lineage.num_tasks
    old_classifier = lineage.classifier
    hidden, labels = hidden.to(device), labels.to(device)
    generator = torch.Generator().manual_seed(train.seed)
    options = MoramOptions.from_config(config, evaluate=False, candidates=0)  # training runs the faithful form
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(train.seed)
        params = [new_atoms(dim, rank, device) for dim in backbone.site_dims]
        block = nn.Parameter(torch.empty(num_classes, backbone.feature_dim, device=device))
        nn.init.trunc_normal_(block, std=0.02)
        with torch.no_grad():
            block.copy_(F.normalize(block, dim=1))  # unit rows, as CaRE's trainer (see its note)

        def site_fn(site: int) -> SiteFn:
            keys, values = params[site]
            current = AtomStack(keys, values)
            atoms = current if lineage.bank is None else AtomStack.concat([lineage.bank.sites[site].atoms, current])
            return lambda tokens, _routing: moram_faithful(tokens, atoms, options)

        def loss_of(rows: Tensor) -> Tensor:
            features = run_sites(backbone, hidden[rows], site_fn)
            return new_class_loss(features, block, old_classifier, labels[rows], config.cosine_scale, train)

        groups = [
            {"params": [p for pair in params for p in pair], "lr_scale": ATOM_LR_SCALE},
            {"params": [block], "lr_scale": 1.0},
        ]
        optimizer = torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
        epoch_losses = sgd_epochs(optimizer, loss_of, len(hidden), train, generator, progress)
    atoms = [AtomStack(keys.detach().clone(), values.detach().clone()) for keys, values in params]
    classifier = torch.cat([old_classifier, block.detach()])
    bank = bank_with(lineage.bank, atoms, rank)
    head: AnalyticHead | None = None
    head_statistics: HeadStatistics | None = None
    inputs = served_moram_inputs(backbone, config, bank, classifier, hidden)
    offset = old_classifier.shape[0]
    head, head_statistics = extend_analytic_head(
        lineage.head, lineage.head_statistics, backbone, train, inputs, labels, num_classes, offset
    )
    with torch.no_grad():
        accuracy = float((head.scores(inputs).argmax(dim=1) == labels + offset).float().mean())
    metrics = {
        "first_loss": epoch_losses[0],
        "final_loss": epoch_losses[-1],
        "train_accuracy": accuracy,
        "epochs": float(len(epoch_losses)),
        "seconds": time.perf_counter() - started,
    }
    return MoramTask(index, atoms, classifier, head, head_statistics, metrics)


def served_moram_inputs(
    backbone: SiteBackbone, config: ModelConfig, bank: AtomBank, classifier: Tensor, hidden: Tensor
) -> Tensor:
    """The analytic head's (unscaled) inputs of `embed_images` output through the atoms of `bank`, as the version
    holding them serves them, in chunks; a normal tensor (callers may keep it beside autograd)."""
    model = MoramModel(config, backbone, bank, classifier)
    return torch.cat(
        [
            head_inputs(*model.features_and_site_vectors(hidden[i : i + EMBED_CHUNK]))
            for i in range(0, len(hidden), EMBED_CHUNK)
        ]
    ).clone()
