"""Stacked, immutable tensors of every learned task's experts and perceptrons.

Experts and perceptrons are needed by every request (the CLS-token scores of all of them pick the routers), so
they stay resident, stacked per site along a leading task dimension. The fast path uses a *folded* form in which
each LayerNorm's affine and each expert's output scale are multiplied into the neighbouring linear layer:

    E(x) = s * (W_up relu(W_down (gamma * xhat + beta) + b_down) + b_up)
         = (s W_up) relu((W_down gamma) xhat + (W_down beta + b_down)) + s b_up,      xhat = (x - mean) / std

so that one normalisation of the tokens serves every expert. The raw form is kept for the reference path, which
mirrors the equations term by term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from model.adapter import LAYER_NORM_EPS, Adapter, Perceptron


def _cat(parts: Sequence[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=0)


@dataclass(frozen=True)
class FoldedAdapters:
    """Folded adapters: `E_i(x) = relu(xhat down_weight[i]^T + down_bias[i]) up_weight[i] + up_bias[i]`.

    The up-projection is stored transposed, (n, r, d), so that hidden units (..., r) multiply it without a
    transpose and gathered experts concatenate along r with no copy.
    """

    down_weight: Tensor  # (n, r, d)
    down_bias: Tensor  # (n, r)
    up_weight: Tensor  # (n, r, d)
    up_bias: Tensor  # (n, d)

    @classmethod
    def concat(cls, parts: Sequence[FoldedAdapters]) -> FoldedAdapters:
        return cls(**{f.name: _cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


@dataclass(frozen=True)
class AdapterStack:
    """Raw parameters of n adapters of one site, stacked along dim 0."""

    norm_weight: Tensor  # (n, d)
    norm_bias: Tensor  # (n, d)
    down_weight: Tensor  # (n, r, d)
    down_bias: Tensor  # (n, r)
    up_weight: Tensor  # (n, d, r)
    up_bias: Tensor  # (n, d)
    scale: Tensor  # (n, d)

    @property
    def count(self) -> int:
        return int(self.down_weight.shape[0])

    @classmethod
    def from_modules(cls, adapters: Sequence[Adapter]) -> AdapterStack:
        """Stack adapter modules; gradients flow into the modules' parameters."""
        return cls(
            norm_weight=torch.stack([a.norm.weight for a in adapters]),
            norm_bias=torch.stack([a.norm.bias for a in adapters]),
            down_weight=torch.stack([a.down.weight for a in adapters]),
            down_bias=torch.stack([a.down.bias for a in adapters]),
            up_weight=torch.stack([a.up.weight for a in adapters]),
            up_bias=torch.stack([a.up.bias for a in adapters]),
            scale=torch.stack([a.scale for a in adapters]),
        )

    @classmethod
    def concat(cls, stacks: Sequence[AdapterStack]) -> AdapterStack:
        return cls(**{f.name: _cat([getattr(s, f.name) for s in stacks]) for f in fields(cls)})

    def fold(self) -> FoldedAdapters:
        return FoldedAdapters(
            down_weight=self.down_weight * self.norm_weight[:, None, :],
            down_bias=torch.einsum("nrd,nd->nr", self.down_weight, self.norm_bias) + self.down_bias,
            up_weight=(self.scale[:, :, None] * self.up_weight).transpose(1, 2).contiguous(),
            up_bias=self.scale * self.up_bias,
        )

    @classmethod
    def empty(cls, dim: int, bottleneck: int) -> AdapterStack:
        """A stack of zero adapters (the bank before the first task)."""
        return cls(
            norm_weight=torch.empty(0, dim),
            norm_bias=torch.empty(0, dim),
            down_weight=torch.empty(0, bottleneck, dim),
            down_bias=torch.empty(0, bottleneck),
            up_weight=torch.empty(0, dim, bottleneck),
            up_bias=torch.empty(0, dim),
            scale=torch.empty(0, dim),
        )

    def to(self, device: torch.device | str) -> AdapterStack:
        return AdapterStack(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def detach(self) -> AdapterStack:
        return AdapterStack(**{f.name: getattr(self, f.name).detach() for f in fields(self)})


@dataclass(frozen=True)
class FoldedPerceptrons:
    """Folded perceptrons: logits of task t are `xhat weight[t] + bias[t]`; padded classes have bias -inf.

    The weight is stored transposed, (T, d, n_max), for a batched matmul with (T, B, d) inputs.
    """

    weight: Tensor  # (T, d, n_max)
    bias: Tensor  # (T, n_max)

    @classmethod
    def concat(cls, parts: Sequence[FoldedPerceptrons]) -> FoldedPerceptrons:
        width = max(int(p.bias.shape[1]) for p in parts)
        return cls(
            weight=_cat([_pad_classes(p.weight.transpose(1, 2), width, 0.0).transpose(1, 2) for p in parts]),
            bias=_cat([_pad_classes(p.bias, width, float("-inf")) for p in parts]),
        )


@dataclass(frozen=True)
class PerceptronTable:
    """Every task's perceptron logits and LayerNorm variance as functions of its expert's CLS hidden units alone.

    With h the r hidden units of expert t on the CLS vector, c_t = h U_t + u_t (folded up-projection and bias) and
    the folded perceptron gives logits = LN(c_t) P_t + p_t, LN(c) = (c - mean(c)) / sqrt(var(c) + eps). Centring
    the rows of U_t and u_t over the d channels (Uc, uc) gives c_t - mean(c_t) = h Uc + uc exactly, so with
    h' = [h, 1] and the (r + 1, d) matrix C = [Uc; uc]:

        var(c_t) = h' (C C^T / d) h'^T          logits = (h' C P_t) / sqrt(var + eps) + p_t

    Both matrices are (r + 1) wide, so level 1 costs O(T r^2) instead of O(T r d) and never forms the (T, B, d)
    routing inputs. Centring before the Gram matrix (in float64) avoids the cancellation of var = E[c^2] - mean^2.

    Attributes:
        weight: (T, r, r + 1 + n): rows of the hidden units in [C C^T / d | C P].
        bias: (T, 1, r + 1 + n): the row of the constant 1.
        logit_bias: (T, n) perceptron biases (-inf on padded classes).
    """

    weight: Tensor
    bias: Tensor
    logit_bias: Tensor

    @classmethod
    def build(cls, experts: FoldedAdapters, perceptrons: FoldedPerceptrons) -> PerceptronTable:
        with torch.no_grad():
            up = experts.up_weight.double()  # (T, r, d)
            up_bias = experts.up_bias.double()[:, None, :]  # (T, 1, d)
            rows = torch.cat([up, up_bias], dim=1)
            centred = rows - rows.mean(dim=2, keepdim=True)  # (T, r + 1, d)
            gram = torch.bmm(centred, centred.transpose(1, 2)) / centred.shape[2]
            table = torch.cat([gram, torch.bmm(centred, perceptrons.weight.double())], dim=2)
            table = table.to(experts.up_weight.dtype)
            rank = up.shape[1]
            return cls(table[:, :rank].contiguous(), table[:, rank:].contiguous(), perceptrons.bias)

    def logits(self, hidden: Tensor) -> Tensor:
        """Perceptron logits (T, B, n) from the experts' CLS hidden units (T, B, r)."""
        rank = hidden.shape[2]
        out = torch.baddbmm(self.bias, hidden, self.weight)  # (T, B, r + 1 + n)
        variance = torch.linalg.vecdot(out[..., :rank], hidden) + out[..., rank]
        scale = variance.clamp_min_(0.0).add_(LAYER_NORM_EPS).rsqrt_()  # rounding must not make it negative
        return torch.addcmul(self.logit_bias[:, None, :], out[..., rank + 1 :], scale[..., None])


@dataclass(frozen=True)
class PerceptronStack:
    """Raw perceptrons of T tasks at one site, padded to the largest class count.

    Padded rows have zero weight and bias -inf, so their softmax probability is exactly 0 and they add exactly 0
    to the entropy: padding changes no routing decision.
    """

    norm_weight: Tensor  # (T, d)
    norm_bias: Tensor  # (T, d)
    weight: Tensor  # (T, n_max, d)
    bias: Tensor  # (T, n_max)
    num_classes: tuple[int, ...]

    @classmethod
    def from_modules(cls, perceptrons: Sequence[Perceptron]) -> PerceptronStack:
        return cls.concat(
            [
                cls(
                    norm_weight=p.norm.weight[None],
                    norm_bias=p.norm.bias[None],
                    weight=p.linear.weight[None],
                    bias=p.linear.bias[None],
                    num_classes=(int(p.linear.weight.shape[0]),),
                )
                for p in perceptrons
            ]
        )

    @classmethod
    def concat(cls, stacks: Sequence[PerceptronStack]) -> PerceptronStack:
        width = max((n for s in stacks for n in s.num_classes), default=0)
        return cls(
            norm_weight=_cat([s.norm_weight for s in stacks]),
            norm_bias=_cat([s.norm_bias for s in stacks]),
            weight=_cat([_pad_classes(s.weight, width, 0.0) for s in stacks]),
            bias=_cat([_pad_classes(s.bias, width, float("-inf")) for s in stacks]),
            num_classes=tuple(n for s in stacks for n in s.num_classes),
        )

    @classmethod
    def empty(cls, dim: int) -> PerceptronStack:
        return cls(torch.empty(0, dim), torch.empty(0, dim), torch.empty(0, 0, dim), torch.empty(0, 0), ())

    def fold(self) -> FoldedPerceptrons:
        return FoldedPerceptrons(
            weight=(self.weight * self.norm_weight[:, None, :]).transpose(1, 2).contiguous(),
            bias=torch.einsum("tnd,td->tn", self.weight, self.norm_bias) + self.bias,
        )

    def detach(self) -> PerceptronStack:
        return PerceptronStack(
            self.norm_weight.detach(),
            self.norm_bias.detach(),
            self.weight.detach(),
            self.bias.detach(),
            self.num_classes,
        )

    def to(self, device: torch.device | str) -> PerceptronStack:
        return PerceptronStack(
            norm_weight=self.norm_weight.to(device),
            norm_bias=self.norm_bias.to(device),
            weight=self.weight.to(device),
            bias=self.bias.to(device),
            num_classes=self.num_classes,
        )


def _pad_classes(tensor: Tensor, width: int, value: float) -> Tensor:
    missing = width - int(tensor.shape[1])
    if missing == 0:
        return tensor
    pad_shape = (tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_full(pad_shape, value)], dim=1)


class SiteBank:
    """Experts, perceptrons and the shared expert of one site, with their folded forms computed once."""

    def __init__(self, experts: AdapterStack, perceptrons: PerceptronStack, shared: AdapterStack) -> None:
        if experts.count != len(perceptrons.num_classes):
            raise ValueError(f"{experts.count} experts but {len(perceptrons.num_classes)} perceptrons at one site")
        self.experts = experts
        self.perceptrons = perceptrons
        self.shared = shared
        self._folded: tuple[FoldedAdapters, FoldedPerceptrons, FoldedAdapters] | None = None
        self._table: PerceptronTable | None = None

    @property
    def num_tasks(self) -> int:
        return self.experts.count

    def folded(self) -> tuple[FoldedAdapters, FoldedPerceptrons, FoldedAdapters]:
        """(experts, perceptrons, shared) in folded form; cached, so only for frozen banks."""
        if self._folded is None:
            # Normal (not inference-mode) tensors even when first asked for inside inference_mode, so that a trainer
            # may use the cache of a bank that was served first.
            with torch.inference_mode(False), torch.no_grad():
                self._folded = (self.experts.fold(), self.perceptrons.fold(), self.shared.fold())
        return self._folded

    def perceptron_table(self) -> PerceptronTable:
        """The inference-time `PerceptronTable` of the folded experts and perceptrons; cached like `folded`."""
        if self._table is None:
            experts, perceptrons, _ = self.folded()
            with torch.inference_mode(False):
                self._table = PerceptronTable.build(experts, perceptrons)
        return self._table


class ExpertBank:
    """The resident part of T learned tasks: one `SiteBank` per site. Immutable: `append` returns a new bank."""

    def __init__(self, sites: Sequence[SiteBank]) -> None:
        self.sites = list(sites)
        counts = {site.num_tasks for site in self.sites}
        if len(counts) > 1:
            raise ValueError(f"sites disagree on the number of tasks: {sorted(counts)}")

    @property
    def num_tasks(self) -> int:
        return self.sites[0].num_tasks if self.sites else 0

    @property
    def num_classes(self) -> tuple[int, ...]:
        return self.sites[0].perceptrons.num_classes if self.sites else ()

    def append(self, experts: Sequence[AdapterStack], perceptrons: Sequence[PerceptronStack]) -> ExpertBank:
        """A new bank with one more task (one-task stacks per site); this bank is left unchanged."""
        return ExpertBank(
            [
                SiteBank(
                    AdapterStack.concat([site.experts, e]),
                    PerceptronStack.concat([site.perceptrons, p]),
                    site.shared,
                )
                for site, e, p in zip(self.sites, experts, perceptrons, strict=True)
            ]
        )

    def prepare_fast_path(self) -> None:
        """Fold every site and build its perceptron table now, so the first request on this bank does not."""
        for site in self.sites:
            site.perceptron_table()

    def detach(self) -> ExpertBank:
        """The same tensors cut from any autograd graph (a trained task's modules stay trainable objects)."""
        return ExpertBank([SiteBank(s.experts.detach(), s.perceptrons.detach(), s.shared.detach()) for s in self.sites])

    def to(self, device: torch.device | str) -> ExpertBank:
        return ExpertBank(
            [SiteBank(s.experts.to(device), s.perceptrons.to(device), s.shared.to(device)) for s in self.sites]
        )
