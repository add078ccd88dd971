"""The BR-MoE computation at one site, in its two forms.

`reference_moe` mirrors the equations: every expert runs on every token, the routing inputs are the CLS rows of
those outputs, and the gates are CaRE's dense masked softmax. Its cost grows with the number of tasks.

`fast_moe` is exact but cheap: experts are token-wise, so the routing inputs E_t(z)[CLS] = E_t(z[CLS]) need only
the CLS (pooled) vector; all experts and perceptrons are scored on that one vector with stacked weights, and only
the at most M*K selected experts (plus E_bar) then run on all tokens, gathered per sample so one batch can mix any
tasks. The only numerical difference is that it drops the e^-100 weights of masked experts.

At inference the fast path does not even form the routing inputs c_t of all T tasks: a perceptron's logits are an
affine function of LayerNorm(c_t), and c_t is an affine function of the expert's r hidden units, so the logits and
the LayerNorm statistics follow from those r numbers and a small per-task table computed once per version
(`PerceptronTable`). Only the c_t of the M selected routers are formed, for their gates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from model.adapter import LAYER_NORM_EPS
from model.bank import AdapterStack, FoldedAdapters, FoldedPerceptrons, PerceptronStack, PerceptronTable
from model.routers import RouterSource
from model.routing import (
    dense_gates,
    entropy,
    router_logits,
    select_routers,
    selected_router_logits,
    sparse_gates,
)


@dataclass
class RoutingOptions:
    """How one forward pass routes.

    Attributes:
        top_routers: M.
        top_experts: K.
        forced_task: Training only: the task being learned (its router is always selected).
        dropout: Dropout on expert hidden units (training only).
        perceptron_logits: If a list, the raw perceptron logits of `forced_task` at each site are appended to it
            (for the auxiliary loss).
        selected: If a list, the (B, M') selected router indices of each site are appended (for analysis/tests).
    """

    top_routers: int
    top_experts: int
    forced_task: int | None = None
    dropout: float = 0.0
    perceptron_logits: list[Tensor] | None = None
    selected: list[Tensor] | None = field(default=None)


def _normalize(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)


def _record(options: RoutingOptions, logits: Tensor, selected: Tensor, num_classes: int | None) -> None:
    # logits are (T, B, n): task first
    if options.perceptron_logits is not None and options.forced_task is not None and num_classes is not None:
        options.perceptron_logits.append(logits[options.forced_task, :, :num_classes])
    if options.selected is not None:
        options.selected.append(selected)


def fast_moe(
    tokens: Tensor,
    routing: Tensor,
    experts: FoldedAdapters,
    perceptrons: FoldedPerceptrons,
    shared: FoldedAdapters,
    site: int,
    routers: RouterSource,
    options: RoutingOptions,
    forced_classes: int | None = None,
    table: PerceptronTable | None = None,
) -> Tensor:
    """BR-MoE delta at one site, computing only the selected experts on all tokens.

    Args:
        tokens: (B, N, d) the site's input z_a.
        routing: (B, d) its CLS token (ViT) or spatial mean (CNN).
        experts, perceptrons, shared: folded tensors of the T tasks at this site.
        site: Site index (to pick routers' weights).
        routers: Router source.
        options: Routing options.
        forced_classes: Class count of the forced task (to slice its perceptron logits).
        table: The site's `PerceptronTable`; when given, inference (no forced task, no dropout, no autograd) scores
            the perceptrons from it and forms the routing inputs of the selected routers only.

    Returns:
        (B, N, d) delta to add to the residual stream.
    """
    num_tasks, bottleneck, _ = experts.down_weight.shape
    batch, tokens_per_sample, dim = tokens.shape
    training = options.dropout > 0.0

    # Level 1 on the CLS/pooled vector only: every expert's down-projection in one GEMM, laid out (T, B, r).
    cls_hidden = F.relu(
        torch.addmm(experts.down_bias.reshape(-1), _normalize(routing), experts.down_weight.reshape(-1, dim).T)
    )
    cls_hidden = F.dropout(cls_hidden, options.dropout, training)
    per_task = cls_hidden.reshape(batch, num_tasks, bottleneck).transpose(0, 1)  # (T, B, r)
    inference = options.forced_task is None and not training and not torch.is_grad_enabled()
    if table is not None and inference:
        # The perceptrons straight from the hidden units (see PerceptronTable); c_t only for the selected pairs.
        logits = table.logits(per_task)  # (T, B, n)
        selected = select_routers(entropy(logits).T, options.top_routers)
        _record(options, logits, selected, forced_classes)
        pairs = selected.reshape(-1)
        rows = torch.arange(batch, device=selected.device).repeat_interleave(selected.shape[1])
        chosen = torch.baddbmm(
            experts.up_bias[pairs][:, None, :], per_task[pairs, rows][:, None, :], experts.up_weight[pairs]
        )
        gate_logits = selected_router_logits(chosen[:, 0], selected, num_tasks, site, routers)
    else:
        # Training (or no table): the up-projections and the perceptrons as task-batched matmuls, as written.
        routing_inputs = torch.baddbmm(experts.up_bias[:, None, :], per_task, experts.up_weight)  # c_t: (T, B, d)
        logits = torch.baddbmm(perceptrons.bias[:, None, :], _normalize(routing_inputs), perceptrons.weight)
        selected = select_routers(entropy(logits).T, options.top_routers, options.forced_task)
        _record(options, logits, selected, forced_classes)
        gate_logits = router_logits(routing_inputs, selected, num_tasks, site, routers)

    # Level 2: top-K experts per selected router.
    indices, weights = sparse_gates(gate_logits, options.top_experts)  # (B, S)

    # The selected experts, gathered per sample, run on all tokens as two batched matmuls; the gate weights are
    # folded into the gathered up-projections. E_bar runs as two plain GEMMs over every token of the batch.
    slots = indices.shape[1]
    normed = _normalize(tokens)
    down = experts.down_weight[indices].reshape(batch, slots * bottleneck, dim)
    down_bias = experts.down_bias[indices].reshape(batch, 1, slots * bottleneck)
    hidden = F.dropout(F.relu(torch.baddbmm(down_bias, normed, down.transpose(1, 2))), options.dropout, training)
    up = (experts.up_weight[indices] * weights[:, :, None, None]).reshape(batch, slots * bottleneck, dim)
    up_bias = (experts.up_bias[indices] * weights[:, :, None]).sum(dim=1)
    mixed = torch.baddbmm(up_bias[:, None, :], hidden, up)

    flat = normed.reshape(batch * tokens_per_sample, dim)
    shared_hidden = F.relu(torch.addmm(shared.down_bias[0], flat, shared.down_weight[0].T))
    shared_out = torch.addmm(
        shared.up_bias[0], F.dropout(shared_hidden, options.dropout, training), shared.up_weight[0]
    )
    return mixed + shared_out.reshape(batch, tokens_per_sample, dim)


def _apply_adapter(stack: AdapterStack, index: int, x: Tensor) -> Tensor:
    """Adapter `index` of a raw stack on x (..., d), exactly as the module computes it (eval mode)."""
    normed = F.layer_norm(x, x.shape[-1:], stack.norm_weight[index], stack.norm_bias[index], LAYER_NORM_EPS)
    hidden = F.relu(F.linear(normed, stack.down_weight[index], stack.down_bias[index]))
    return stack.scale[index] * F.linear(hidden, stack.up_weight[index], stack.up_bias[index])


def reference_moe(
    tokens: Tensor,
    routing: Tensor,
    experts: AdapterStack,
    perceptrons: PerceptronStack,
    shared: AdapterStack,
    site: int,
    routers: RouterSource,
    options: RoutingOptions,
) -> Tensor:
    """BR-MoE delta at one site, term by term as in CaRE eqs. 3-7 (inference only): every expert on every token."""
    num_tasks = experts.count
    outputs = torch.stack([_apply_adapter(experts, t, tokens) for t in range(num_tasks)], dim=1)  # (B, T, N, d)
    routing_inputs = torch.stack([_apply_adapter(experts, t, routing) for t in range(num_tasks)])  # (T, B, d)
    logits = torch.full((num_tasks, tokens.shape[0], max(perceptrons.num_classes)), float("-inf"), device=tokens.device)
    for t, classes in enumerate(perceptrons.num_classes):
        normed = F.layer_norm(
            routing_inputs[t],
            routing.shape[-1:],
            perceptrons.norm_weight[t],
            perceptrons.norm_bias[t],
            LAYER_NORM_EPS,
        )
        logits[t, :, :classes] = F.linear(normed, perceptrons.weight[t, :classes], perceptrons.bias[t, :classes])
    selected = select_routers(entropy(logits).T, options.top_routers)
    _record(options, logits, selected, None)
    gates = dense_gates(router_logits(routing_inputs, selected, num_tasks, site, routers), options.top_experts)
    mixed = torch.einsum("bt,btnd->bnd", gates, outputs)
    return mixed + _apply_adapter(shared, 0, tokens)
