"""A task's learned weights and the trainer's state as plain tensor dicts, with a documented key scheme.

Key scheme (s = site index, 0-based; names after the prefix are the modules' own state-dict names):

    kind "task-experts"   sites.{s}.expert.{norm.weight,norm.bias,down.weight,down.bias,up.weight,up.bias,scale}
                          sites.{s}.perceptron.{norm.weight,norm.bias,linear.weight,linear.bias}
    kind "task-routers"   sites.{s}.router.{weight,bias}           weight (t, d) for the t-th task (1-based)
    kind "shared"         sites.{s}.shared.{same names as expert}
    kind "task-atoms"     sites.{s}.atoms.{keys,values}             (r, d) each: a MoRAM task's atoms (model/moram.py)
    kind "task-seta"      sites.{s}.unique.{same names as expert}   a SETA task's unique expert (model/seta.py)
                          sites.{s}.gate                            (1, d): its unit gate row
    kind "classifier"     classifier.weight                         (C, D), task blocks in task order
                          head.{scale,weight,bias,temperature}      the analytic head (model/head.py), if any
    kind "trainer-state"  stats.mean (C, D), stats.var (C, D) or stats.cov (C, D, D), stats.count (C,)  (cosine)
                          head.gram (D', D'), head.class_sums (C, D'), head.class_counts (C,)   (analytic head)
                          seta.importance.sites.{s}.{same names as expert}   SETA's anchor importance Omega

Every file carries string metadata: `care.format`, `care.kind`, `care.model_config` (JSON of ModelConfig),
`care.fingerprint` and `care.site_dims` (JSON list), plus kind-specific entries (`care.task_index`,
`care.num_classes`). Loading checks the fingerprint and every shape against the running backbone, so weights made
for another backbone or configuration are refused with a message that says what to do.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict

import torch
from torch import Tensor, nn

from model.adapter import TaskModules
from model.bank import AdapterStack, ExpertBank, PerceptronStack, SiteBank
from model.config import ModelConfig
from model.head import AnalyticHead
from model.moram import AtomStack
from model.routers import TaskRouters

FORMAT_VERSION = "1"
KIND_TASK_EXPERTS = "task-experts"
KIND_TASK_ROUTERS = "task-routers"
KIND_SHARED = "shared"
KIND_CLASSIFIER = "classifier"
KIND_TRAINER_STATE = "trainer-state"
KIND_TASK_ATOMS = "task-atoms"
KIND_TASK_SETA = "task-seta"
SETA_IMPORTANCE = "seta.importance"  # trainer-state prefix of SETA's Omega

_ADAPTER_KEYS = ("norm.weight", "norm.bias", "down.weight", "down.bias", "up.weight", "up.bias", "scale")
_PERCEPTRON_KEYS = ("norm.weight", "norm.bias", "linear.weight", "linear.bias")


class IncompatibleArtifactError(ValueError):
    """Tensors made for another backbone, configuration or format."""


def metadata(config: ModelConfig, kind: str, site_dims: Sequence[int], **extra: str | int) -> dict[str, str]:
    """The string metadata stored with an artifact of `kind`."""
    meta = {
        "care.format": FORMAT_VERSION,
        "care.kind": kind,
        "care.model_config": json.dumps(config.to_dict(), sort_keys=True),
        "care.fingerprint": config.fingerprint(),
        "care.site_dims": json.dumps(list(site_dims)),
    }
    meta.update({f"care.{key}": str(value) for key, value in extra.items()})
    return meta


def check_metadata(meta: Mapping[str, str], config: ModelConfig, kind: str, source: str) -> None:
    """Refuse an artifact of another format, kind or model configuration.

    Args:
        meta: The artifact's metadata.
        config: The running model's configuration.
        kind: The kind expected.
        source: A name for the artifact in error messages (e.g. its file path).
    """
    if meta.get("care.format") != FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"{source}: artifact format {meta.get('care.format')!r}, this care-serve reads format {FORMAT_VERSION}"
        )
    if meta.get("care.kind") != kind:
        raise IncompatibleArtifactError(f"{source}: is a {meta.get('care.kind')!r} artifact, expected {kind!r}")
    if meta.get("care.fingerprint") != config.fingerprint():
        try:
            theirs = ModelConfig.from_dict(json.loads(meta.get("care.model_config", "{}")))
            # Every field, not `to_dict`: that leaves out what a CaRE configuration does not record (the method).
            running = asdict(config)
            differences = ", ".join(
                f"{k}={v!r} (running: {running[k]!r})" for k, v in asdict(theirs).items() if running[k] != v
            )
        except (ValueError, TypeError) as exc:
            differences = f"unreadable configuration ({exc})"
        raise IncompatibleArtifactError(
            f"{source}: made for another model configuration: {differences or 'fingerprint differs'}. Start the "
            "service with the configuration the registry was created with, or use a registry made for this one."
        )


def _prefixed(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    return {f"{prefix}.{key}": value.detach().cpu().contiguous() for key, value in module.state_dict().items()}


def task_expert_tensors(task: TaskModules) -> dict[str, Tensor]:
    """Experts and perceptrons of a trained task (the part that stays resident when served)."""
    tensors: dict[str, Tensor] = {}
    for site, (expert, perceptron) in enumerate(zip(task.experts, task.perceptrons, strict=True)):
        tensors.update(_prefixed(f"sites.{site}.expert", expert))
        tensors.update(_prefixed(f"sites.{site}.perceptron", perceptron))
    return tensors


def task_router_tensors(task: TaskModules) -> dict[str, Tensor]:
    """Routers of a trained task (the part the serving cache loads on demand)."""
    tensors: dict[str, Tensor] = {}
    for site, router in enumerate(task.routers):
        tensors.update(_prefixed(f"sites.{site}.router", router))
    return tensors


def shared_tensors(shared: Iterable[nn.Module]) -> dict[str, Tensor]:
    """E_bar of every site."""
    tensors: dict[str, Tensor] = {}
    for site, adapter in enumerate(shared):
        tensors.update(_prefixed(f"sites.{site}.shared", adapter))
    return tensors


def _expect(tensors: Mapping[str, Tensor], key: str, shape: tuple[int, ...], source: str) -> Tensor:
    if key not in tensors:
        raise IncompatibleArtifactError(f"{source}: missing tensor {key!r}; the file is not a complete artifact")
    tensor = tensors[key]
    if tuple(tensor.shape) != shape:
        raise IncompatibleArtifactError(
            f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the running backbone needs {shape}; the "
            "artifact was made for another backbone or configuration"
        )
    return tensor


def _check_no_extra(tensors: Mapping[str, Tensor], expected: set[str], source: str) -> None:
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise IncompatibleArtifactError(f"{source}: unexpected tensors {unexpected[:5]}; not an artifact of this kind")


def adapter_stack_from_tensors(
    tensors: Mapping[str, Tensor], prefix: str, dim: int, rank: int, source: str
) -> AdapterStack:
    """One adapter (a stack of one) from `prefix.{norm.weight,...}` keys, shapes checked."""
    shapes = {
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "down.weight": (rank, dim),
        "down.bias": (rank,),
        "up.weight": (dim, rank),
        "up.bias": (dim,),
        "scale": (dim,),
    }
    got = {name: _expect(tensors, f"{prefix}.{name}", shape, source)[None] for name, shape in shapes.items()}
    return AdapterStack(
        norm_weight=got["norm.weight"],
        norm_bias=got["norm.bias"],
        down_weight=got["down.weight"],
        down_bias=got["down.bias"],
        up_weight=got["up.weight"],
        up_bias=got["up.bias"],
        scale=got["scale"],
    )


_STACK_KEYS = dict(zip(_ADAPTER_KEYS, (f.name for f in dataclasses.fields(AdapterStack)), strict=True))


def adapter_stack_tensors(prefix: str, stack: AdapterStack) -> dict[str, Tensor]:
    """The inverse of `adapter_stack_from_tensors`: a stack of one adapter under `prefix.{norm.weight,...}`."""
    if stack.count != 1:
        raise ValueError(f"{prefix}: expected a stack of one adapter, got {stack.count}")
    return {f"{prefix}.{key}": getattr(stack, name)[0].detach().cpu().contiguous() for key, name in _STACK_KEYS.items()}


def stacks_tensors(role: str, stacks: Sequence[AdapterStack], prefix: str = "sites") -> dict[str, Tensor]:
    """One adapter per site (SETA's shared experts, or their importance) under `{prefix}.{s}.{role}.*` (no role:
    `{prefix}.{s}.*`)."""
    tensors: dict[str, Tensor] = {}
    for site, stack in enumerate(stacks):
        tensors.update(adapter_stack_tensors(_site_key(prefix, site, role), stack))
    return tensors


def _site_key(prefix: str, site: int, role: str) -> str:
    return f"{prefix}.{site}.{role}" if role else f"{prefix}.{site}"


def stacks_from_tensors(
    tensors: Mapping[str, Tensor], role: str, site_dims: Sequence[int], rank: int, source: str, prefix: str = "sites"
) -> list[AdapterStack]:
    """The inverse of `stacks_tensors`, shapes checked."""
    return [
        adapter_stack_from_tensors(tensors, _site_key(prefix, site, role), dim, rank, source)
        for site, dim in enumerate(site_dims)
    ]


def seta_task_tensors(unique: Sequence[AdapterStack], gates: Sequence[Tensor]) -> dict[str, Tensor]:
    """A SETA task's unique experts and gate rows, one of each per site."""
    tensors = stacks_tensors("unique", unique)
    for site, gate in enumerate(gates):
        tensors[f"sites.{site}.gate"] = gate.detach().cpu().contiguous()
    return tensors


def seta_task_from_tensors(
    tensors: Mapping[str, Tensor], config: ModelConfig, site_dims: Sequence[int], source: str
) -> tuple[list[AdapterStack], list[Tensor]]:
    """Per-site unique experts and gate rows of one SETA task from a "task-seta" tensor dict, shapes checked."""
    unique = stacks_from_tensors(tensors, "unique", site_dims, config.expert_dim, source)
    gates = [_expect(tensors, f"sites.{site}.gate", (1, dim), source) for site, dim in enumerate(site_dims)]
    expected = {f"sites.{s}.unique.{k}" for s in range(len(site_dims)) for k in _ADAPTER_KEYS}
    _check_no_extra(tensors, expected | {f"sites.{s}.gate" for s in range(len(site_dims))}, source)
    return unique, gates


def task_stacks_from_tensors(
    tensors: Mapping[str, Tensor], config: ModelConfig, site_dims: Sequence[int], num_classes: int, source: str
) -> tuple[list[AdapterStack], list[PerceptronStack]]:
    """Per-site one-task expert and perceptron stacks from a "task-experts" tensor dict."""
    experts: list[AdapterStack] = []
    perceptrons: list[PerceptronStack] = []
    expected: set[str] = set()
    for site, dim in enumerate(site_dims):
        experts.append(adapter_stack_from_tensors(tensors, f"sites.{site}.expert", dim, config.expert_dim, source))
        prefix = f"sites.{site}.perceptron"
        perceptrons.append(
            PerceptronStack(
                norm_weight=_expect(tensors, f"{prefix}.norm.weight", (dim,), source)[None],
                norm_bias=_expect(tensors, f"{prefix}.norm.bias", (dim,), source)[None],
                weight=_expect(tensors, f"{prefix}.linear.weight", (num_classes, dim), source)[None],
                bias=_expect(tensors, f"{prefix}.linear.bias", (num_classes,), source)[None],
                num_classes=(num_classes,),
            )
        )
        expected.update(f"sites.{site}.expert.{k}" for k in _ADAPTER_KEYS)
        expected.update(f"{prefix}.{k}" for k in _PERCEPTRON_KEYS)
    _check_no_extra(tensors, expected, source)
    return experts, perceptrons


def task_atom_tensors(atoms: Sequence[AtomStack]) -> dict[str, Tensor]:
    """A MoRAM task's atoms, one (keys, values) pair per site."""
    tensors: dict[str, Tensor] = {}
    for site, stack in enumerate(atoms):
        tensors[f"sites.{site}.atoms.keys"] = stack.keys.detach().cpu().contiguous()
        tensors[f"sites.{site}.atoms.values"] = stack.values.detach().cpu().contiguous()
    return tensors


def atoms_from_tensors(
    tensors: Mapping[str, Tensor], config: ModelConfig, site_dims: Sequence[int], source: str
) -> list[AtomStack]:
    """Per-site atoms of one MoRAM task from a "task-atoms" tensor dict, shapes checked."""
    rank = config.moram_rank
    atoms = [
        AtomStack(
            _expect(tensors, f"sites.{site}.atoms.keys", (rank, dim), source),
            _expect(tensors, f"sites.{site}.atoms.values", (rank, dim), source),
        )
        for site, dim in enumerate(site_dims)
    ]
    _check_no_extra(
        tensors, {f"sites.{s}.atoms.{k}" for s in range(len(site_dims)) for k in ("keys", "values")}, source
    )
    return atoms


def routers_from_tensors(
    tensors: Mapping[str, Tensor], task_index: int, site_dims: Sequence[int], source: str
) -> TaskRouters:
    """Per-site (weight, bias) of 0-based task `task_index` from a "task-routers" tensor dict."""
    width = task_index + 1
    routers = [
        (
            _expect(tensors, f"sites.{site}.router.weight", (width, dim), source),
            _expect(tensors, f"sites.{site}.router.bias", (width,), source),
        )
        for site, dim in enumerate(site_dims)
    ]
    _check_no_extra(
        tensors, {f"sites.{s}.router.{k}" for s in range(len(site_dims)) for k in ("weight", "bias")}, source
    )
    return routers


def empty_bank(shared: Mapping[str, Tensor], config: ModelConfig, site_dims: Sequence[int], source: str) -> ExpertBank:
    """A bank of zero tasks holding E_bar (from a "shared" tensor dict)."""
    sites = []
    for site, dim in enumerate(site_dims):
        stack = adapter_stack_from_tensors(shared, f"sites.{site}.shared", dim, config.shared_dim, source)
        sites.append(SiteBank(AdapterStack.empty(dim, config.expert_dim), PerceptronStack.empty(dim), stack))
    return ExpertBank(sites)


def classifier_tensors(weight: Tensor, head: AnalyticHead | None = None) -> dict[str, Tensor]:
    """The cosine classifier, and the analytic head when the version has one."""
    tensors = {"classifier.weight": weight}
    if head is not None:
        tensors.update(head.to_tensors())
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def classifier_from_tensors(tensors: Mapping[str, Tensor], num_classes: int, feature_dim: int, source: str) -> Tensor:
    return _expect(tensors, "classifier.weight", (num_classes, feature_dim), source)


def head_from_tensors(
    tensors: Mapping[str, Tensor], config: ModelConfig, num_classes: int, source: str
) -> AnalyticHead | None:
    """The analytic head of a classifier file; None under the cosine head. Refuses a file that does not match."""
    has_head = any(key.startswith("head.") for key in tensors)
    if config.head == "cosine":
        if has_head:
            raise IncompatibleArtifactError(
                f"{source}: has an analytic head, but the configuration serves the cosine one"
            )
        return None
    if not has_head:
        raise IncompatibleArtifactError(f"{source}: has no analytic head; it was made for the cosine head")
    try:
        return AnalyticHead.from_tensors(dict(tensors), num_classes, source)
    except ValueError as error:
        raise IncompatibleArtifactError(str(error)) from None


def trainer_state_tensors(
    stats: Mapping[str, Tensor] | None,
    head: Mapping[str, Tensor] | None = None,
    importance: Sequence[AdapterStack] | None = None,
) -> dict[str, Tensor]:
    """Per-class statistics under `stats.*` keys, the analytic head's under `head.*` and SETA's anchor importance
    under `seta.importance.*`."""
    tensors = {f"stats.{key}": value for key, value in (stats or {}).items()}
    tensors.update({f"head.{key}": value for key, value in (head or {}).items()})
    if importance is not None:
        tensors.update(stacks_tensors("", importance, prefix=SETA_IMPORTANCE))
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def trainer_state_from_tensors(tensors: Mapping[str, Tensor], prefix: str = "stats") -> dict[str, Tensor]:
    """The `prefix.*` part of a trainer state ("stats": cosine-head statistics, "head": analytic-head ones)."""
    return {key.removeprefix(f"{prefix}."): value for key, value in tensors.items() if key.startswith(f"{prefix}.")}


def stack_tasks(
    shared: Mapping[str, Tensor],
    tasks: Sequence[tuple[Mapping[str, Tensor], int]],
    config: ModelConfig,
    site_dims: Sequence[int],
    device: torch.device | str = "cpu",
) -> ExpertBank:
    """Build the bank of several tasks at once from (task-experts tensors, class count) pairs, in task order."""
    bank = empty_bank(shared, config, site_dims, "shared")
    per_site_experts: list[list[AdapterStack]] = [[site.experts] for site in bank.sites]
    per_site_perceptrons: list[list[PerceptronStack]] = [[site.perceptrons] for site in bank.sites]
    for index, (tensors, num_classes) in enumerate(tasks):
        experts, perceptrons = task_stacks_from_tensors(tensors, config, site_dims, num_classes, f"task {index}")
        for site in range(len(site_dims)):
            per_site_experts[site].append(experts[site])
            per_site_perceptrons[site].append(perceptrons[site])
    return ExpertBank(
        [
            SiteBank(AdapterStack.concat(e), PerceptronStack.concat(p), site.shared)
            for site, e, p in zip(bank.sites, per_site_experts, per_site_perceptrons, strict=True)
        ]
    ).to(device)
