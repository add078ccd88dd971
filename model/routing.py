"""Bi-level routing decisions shared by both inference paths (CaRE sections 1.4-1.5).

Level 1 picks, per sample and site, the M task routers whose class perceptrons are most confident (lowest
entropy). Level 2 lets each selected router weight its top-K experts. The reference and fast paths differ only in
how they apply those weights, never in the decisions, so the decisions live here once.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from model.routers import RouterSource

ENTROPY_EPS = 1e-10  # CaRE's epsilon inside the log
MASKED_GATE_LOGIT = -100.0  # CaRE masks non-top-K gate logits to -100 (not -inf) before the softmax


def entropy(logits: Tensor) -> Tensor:
    """Raw (un-normalised) entropy of softmax(logits) over the last dim; -inf logits contribute exactly 0."""
    probs = torch.softmax(logits, dim=-1)
    return -(probs * torch.log(probs + ENTROPY_EPS)).sum(dim=-1)


def select_routers(entropies: Tensor, top_routers: int, forced_task: int | None = None) -> Tensor:
    """Indices of the routers each sample uses at one site.

    Args:
        entropies: (B, T) perceptron entropies of the T tasks.
        top_routers: M.
        forced_task: While learning task `forced_task` (the last index), its router is always used and the other
            M - 1 come from the earlier tasks; its own perceptron does not take part. None at inference.

    Returns:
        (B, M') task indices, M' = min(M, T), lowest entropy first (the forced task last).
    """
    if forced_task is None:
        count = min(top_routers, entropies.shape[1])
        return torch.topk(entropies, count, dim=1, largest=False).indices
    count = min(top_routers - 1, forced_task)
    forced = torch.full((entropies.shape[0], 1), forced_task, dtype=torch.long, device=entropies.device)
    if count == 0:
        return forced
    earlier = torch.topk(entropies[:, :forced_task], count, dim=1, largest=False).indices
    return torch.cat([earlier, forced], dim=1)


def router_logits(inputs: Tensor, selected: Tensor, num_tasks: int, site: int, routers: RouterSource) -> Tensor:
    """Gate logits of every selected router, padded with -inf to the current number of experts.

    Args:
        inputs: (T, B, d) routing inputs: c_t = E_t(z)[CLS] for every task t ("after adapter" placement).
        selected: (B, M') selected task indices.
        num_tasks: T.
        site: Site index, to pick the site's weights from each task's routers.
        routers: Where routers come from; each task's routers are held only while its gates are computed.

    Returns:
        (B, M', T) logits; router t (0-based) only sees experts 0..t, the rest is -inf.
    """
    batch, per_sample = selected.shape
    rows = torch.arange(batch, device=selected.device).repeat_interleave(per_sample)
    return selected_router_logits(inputs[selected.reshape(-1), rows], selected, num_tasks, site, routers)


def selected_router_logits(
    chosen_inputs: Tensor, selected: Tensor, num_tasks: int, site: int, routers: RouterSource
) -> Tensor:
    """`router_logits` from the routing inputs of the selected (sample, router) pairs only.

    Args:
        chosen_inputs: (B * M', d) c_t of each selected pair, in the row-major order of `selected`.
        selected: (B, M') selected task indices.
        num_tasks: T.
        site: Site index.
        routers: Router source.

    Returns:
        (B, M', T) logits, as `router_logits`.
    """
    batch, per_sample = selected.shape
    flat = selected.reshape(-1)
    # Group the (sample, router) pairs by task so each router is fetched once and used in one matmul; each
    # router's logits are written straight into their rows of one -inf filled buffer (no per-task padding).
    order = torch.argsort(flat, stable=True)
    tasks, counts = torch.unique_consecutive(flat[order], return_counts=True)
    sorted_inputs = chosen_inputs[order]
    grouped = sorted_inputs.new_full((len(flat), num_tasks), float("-inf"))
    start = 0
    for task, count in zip(tasks.tolist(), counts.tolist(), strict=True):
        with routers.hold(task) as task_routers:
            weight, bias = task_routers[site]
            grouped[start : start + count, : weight.shape[0]] = F.linear(
                sorted_inputs[start : start + count], weight, bias
            )
        start += count
    result = torch.empty_like(grouped)
    result[order] = grouped
    return result.reshape(batch, per_sample, num_tasks)


def sparse_gates(logits: Tensor, top_experts: int) -> tuple[Tensor, Tensor]:
    """Top-K experts of every selected router and their softmax weights (the fast path's form).

    Returns:
        (indices, weights), each (B, M' * K'), K' = min(K, T). Experts a router cannot see get weight 0.
    """
    count = min(top_experts, logits.shape[-1])
    values, indices = torch.topk(logits, count, dim=-1)
    weights = torch.softmax(values, dim=-1)
    return indices.flatten(1), weights.flatten(1)


def dense_gates(logits: Tensor, top_experts: int) -> Tensor:
    """Per-expert weights summed over the selected routers, exactly as CaRE's code computes them.

    Non-top-K logits of existing experts are set to -100 (so they keep a weight of about e^-100), experts a router
    cannot see stay at -inf. Returns (B, T).
    """
    count = min(top_experts, logits.shape[-1])
    top = torch.topk(logits, count, dim=-1).indices
    in_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
    keep = in_top | torch.isinf(logits)
    masked = torch.where(keep, logits, torch.full_like(logits, MASKED_GATE_LOGIT))
    return torch.softmax(masked, dim=-1).sum(dim=1)
