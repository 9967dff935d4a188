"""The trainable layers of the sequence model, each with its Opacus per-sample gradient.

Every layer takes batch-first tensors and returns one tensor, so Opacus' hooks
(``grad-sample-mode = hooks``) capture its inputs and the gradient of its output; the
``@register_grad_sampler`` functions below turn those into each example's own gradient,
exactly (``tests/test_sequence_model.py`` checks them against per-example autograd).

* :class:`RecencyPool`: ``q_t = Σ_l w_l · x_{t−l}`` over the last ``L`` positions (lag 0 is
  the position itself). ``w`` starts at ``(1, 0, …, 0)``: the untrained query is the newest
  item's vector, the text ranker the model starts from. Given a stack ``[B, T, L, H]`` instead
  (a region silo's history: the newest L events on the target's platform at each position,
  :func:`platform_streams`) it pools that.
* :class:`LagPool`: ``Σ_l v_l · y_{t,l}`` over a stack ``[B, T, L, H]`` — the newest L events on
  the OTHER platforms, ``v`` starting at 0 (a region silo's cross-platform signal).
* :class:`ScoreHead`: the next-item score of a candidate j at a position,
  ``s·cos(q, e_j) + w_p·log prior(j) + w_t·log(1 + Σ_l exp(a_l)·n(i_{t−l}, j))`` — a learned
  temperature ``s = exp(log_scale)``, the DP popularity prior's weight, and the DP transition
  counts ``n`` of the history's last items with j, weighted per lag (:mod:`shared_model.transitions`).
  The counts are sparse: ``(index, lag, count)`` triples per example, ``index`` into the
  flattened ``[T, M]`` score grid (−1: padding).
* :class:`HistoryFeatureHead`: the next-interest conditional logit over per-category features
  of the history (:mod:`shared_model.interest_features`), per position.
"""

from __future__ import annotations

import math

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn


def shifted(x: torch.Tensor, lag: int) -> torch.Tensor:
    """``x`` moved ``lag`` positions later along dim 1 (``out[:, t] = x[:, t − lag]``, zero before)."""
    if lag == 0:
        return x
    return torch.nn.functional.pad(x[:, : x.shape[1] - lag], (0, 0, lag, 0)) if lag < x.shape[1] else torch.zeros_like(x)


class RecencyPool(nn.Module):
    """``q_t = Σ_{l<L} w_l · x_{t−l}`` over a window ``[B, T, H]``, or ``Σ_l w_l · x_{t,l}`` over
    a stack ``[B, T, L, H]`` (see the module docstring)."""

    def __init__(self, lags: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(lags))
        with torch.no_grad():
            self.weight[0] = 1.0

    @property
    def lags(self) -> int:
        return self.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        if x.dim() == 4:
            return torch.einsum("btlh,l->bth", x, w[: x.shape[2]])
        out = w[0] * x
        for lag in range(1, min(self.lags, x.shape[1])):
            out = out + w[lag] * shifted(x, lag)
        return out


@register_grad_sampler(RecencyPool)
def _recency_pool_grad_sample(layer: RecencyPool, activations: list[torch.Tensor], backprops: torch.Tensor):
    x = activations[0].to(backprops.dtype)
    t = x.shape[1]
    grad = backprops.new_zeros(x.shape[0], layer.lags)
    if x.dim() == 4:
        grad[:, : x.shape[2]] = torch.einsum("btlh,bth->bl", x, backprops)
        return {layer.weight: grad}
    for lag in range(min(layer.lags, t)):
        grad[:, lag] = (backprops[:, lag:] * x[:, : t - lag]).sum((1, 2))
    return {layer.weight: grad}


class LagPool(nn.Module):
    """``Σ_l v_l · y_{t,l}`` over a stack ``[B, T, L, H]``; ``v`` starts at zero."""

    def __init__(self, lags: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(lags))

    @property
    def lags(self) -> int:
        return self.weight.numel()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btlh,l->bth", y, self.weight.to(y.dtype)[: y.shape[2]])


@register_grad_sampler(LagPool)
def _lag_pool_grad_sample(layer: LagPool, activations: list[torch.Tensor], backprops: torch.Tensor):
    y = activations[0].to(backprops.dtype)
    grad = backprops.new_zeros(y.shape[0], layer.lags)
    grad[:, : y.shape[2]] = torch.einsum("btlh,bth->bl", y, backprops)
    return {layer.weight: grad}


class ColdScale(nn.Module):
    """``q · exp(c)`` at the positions of ``cold`` ``[B, T]`` (no event on the target's platform
    yet), ``q`` elsewhere: the text term's own temperature for a cold-start query, which is
    made of another platform's items; ``c`` starts at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1))

    def forward(self, q: torch.Tensor, cold: torch.Tensor) -> torch.Tensor:
        factor = torch.where(cold, self.log_scale.exp().to(q.dtype), torch.ones((), dtype=q.dtype, device=q.device))
        return q * factor.unsqueeze(-1)


@register_grad_sampler(ColdScale)
def _cold_scale_grad_sample(layer: ColdScale, activations: list[torch.Tensor], backprops: torch.Tensor):
    q, cold = activations[0].to(backprops.dtype), activations[1]
    per = ((backprops * q).sum(-1) * cold.to(backprops.dtype)).sum(1) * layer.log_scale.exp().to(backprops.dtype)
    return {layer.log_scale: per.unsqueeze(1)}


def lag_positions(mask: torch.Tensor, lags: int) -> torch.Tensor:
    """``[B, T, L]``: at each position t, the position of the l-th newest event at or before t
    among those where ``mask`` ``[B, T]`` holds (−1 where there is none)."""
    b, t = mask.shape
    count = mask.long().cumsum(1)
    rank = torch.where(mask, count - 1, torch.full_like(count, t))  # the others go to a spare column
    at = torch.full((b, t + 1), -1, dtype=torch.long, device=mask.device)
    at.scatter_(1, rank, torch.arange(t, device=mask.device).expand(b, t))
    want = count.unsqueeze(-1) - 1 - torch.arange(lags, device=mask.device)
    found = at[:, :t].gather(1, want.clamp_min(0).view(b, -1)).view(b, t, lags)
    return torch.where(want >= 0, found, torch.full_like(found, -1))


def platform_streams(x: torch.Tensor, platforms: torch.Tensor, valid: torch.Tensor, target: torch.Tensor,
                     same_lags: int, other_lags: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixed history's two stacks at each position t for its target platform ``target[b, t]``:
    the vectors of the newest ``same_lags`` events at or before t on that platform (an event
    of unknown platform, −1, counts as on it) and of the newest ``other_lags`` on the others,
    ``[B, T, L, H]`` each, 0 where there is none. A position with no event on its target's
    platform yet (cold start on it) reads the newest events of any platform as its first
    stack; the third output ``[B, T]`` marks those positions. On a one-platform window the
    first is the window shifted by each lag (what :class:`RecencyPool` reads), the second all
    zeros, the third false where the window has an event."""
    b, t, h = x.shape
    same = torch.full((b, t, same_lags), -1, dtype=torch.long, device=x.device)
    other = torch.full((b, t, other_lags), -1, dtype=torch.long, device=x.device)
    cold = torch.zeros(b, t, dtype=torch.bool, device=x.device)
    for k in torch.unique(target).tolist():
        here = (target == k).unsqueeze(-1)
        on = valid & ((platforms == k) | (platforms < 0))
        own = lag_positions(on, same_lags)
        none = (own[..., 0] < 0) & valid
        own = torch.where(none.unsqueeze(-1), lag_positions(valid, same_lags), own)  # none yet: any platform's
        same = torch.where(here, own, same)
        other = torch.where(here, lag_positions(valid & ~on, other_lags), other)
        cold = torch.where(here[..., 0], none, cold)

    def gather(index: torch.Tensor) -> torch.Tensor:
        flat = x.gather(1, index.clamp_min(0).view(b, -1, 1).expand(-1, -1, h)).view(b, t, -1, h)
        return flat * (index >= 0).unsqueeze(-1).to(x.dtype)

    return gather(same), gather(other), cold


def transition_mass(index: torch.Tensor, lag: torch.Tensor, count: torch.Tensor, lag_weights: torch.Tensor,
                    width: int) -> torch.Tensor:
    """``[B, width]``: per example, ``Σ exp(a_lag)·count`` scattered to ``index`` (−1: padding)."""
    b = index.shape[0]
    slot = torch.where(index >= 0, index, torch.full_like(index, width))  # padding → a spare column
    mass = torch.zeros(b, width + 1, dtype=lag_weights.dtype, device=index.device)
    mass.scatter_add_(1, slot, lag_weights.exp()[lag.clamp_min(0)] * count.to(lag_weights.dtype))
    return mass[:, :width]


class ScoreHead(nn.Module):
    """Next-item scores ``[B, T, M]`` from the candidates' cosines, log priors and the sparse
    transition counts (see the module docstring). ``popularity`` / ``transitions`` off: that
    term and its weights do not exist."""

    def __init__(self, logit_scale: float, popularity_weight: float | None, transition_weight: float | None,
                 transition_lags: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([math.log(logit_scale)]))
        self.popularity_weight = (nn.Parameter(torch.tensor([float(popularity_weight)]))
                                  if popularity_weight is not None else None)
        if transition_weight is not None:
            self.transition_weight = nn.Parameter(torch.tensor([float(transition_weight)]))
            # the newest item's transitions first: exp(a_l) starts at 0.5^l
            self.transition_lags = nn.Parameter(-math.log(2.0) * torch.arange(transition_lags, dtype=torch.float32))
        else:
            self.transition_weight = self.transition_lags = None

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, cos: torch.Tensor, log_prior: torch.Tensor, index: torch.Tensor, lag: torch.Tensor,
                count: torch.Tensor) -> torch.Tensor:
        out = self.scale * cos.float()
        if self.popularity_weight is not None:
            out = out + self.popularity_weight * log_prior
        if self.transition_weight is not None and index.numel():
            b, t, m = out.shape
            mass = transition_mass(index, lag, count, self.transition_lags, t * m).view(b, t, m)
            out = out + self.transition_weight * torch.log1p(mass)
        return out


@register_grad_sampler(ScoreHead)
def _score_head_grad_sample(layer: ScoreHead, activations: list[torch.Tensor], backprops: torch.Tensor):
    cos, log_prior, index, lag, count = activations
    g = backprops.float()
    b, t, m = g.shape
    out = {layer.log_scale: (g * cos.float() * layer.scale).sum((1, 2)).unsqueeze(1)}
    if layer.popularity_weight is not None:
        out[layer.popularity_weight] = (g * log_prior.float()).sum((1, 2)).unsqueeze(1)
    if layer.transition_weight is not None:
        lags = layer.transition_lags
        if index.numel():
            mass = transition_mass(index, lag, count, lags, t * m)
            out[layer.transition_weight] = (g.view(b, -1) * torch.log1p(mass)).sum(1, keepdim=True)
            slot = index.clamp_min(0)
            at = g.view(b, -1).gather(1, slot) / (1.0 + mass.gather(1, slot))  # ∂score/∂mass at each entry
            per_entry = at * layer.transition_weight * lags.exp()[lag.clamp_min(0)] * count.float()
            per_entry = per_entry * (index >= 0)
            out[lags] = torch.zeros(b, lags.numel(), dtype=g.dtype, device=g.device).scatter_add_(
                1, lag.clamp_min(0), per_entry)
        else:
            out[layer.transition_weight] = g.new_zeros(b, 1)
            out[lags] = g.new_zeros(b, lags.numel())
    return {p: v for p, v in out.items() if p.requires_grad}


class HistoryFeatureHead(nn.Module):
    """``logit_c += Σ_f f_cf · (θ_f + δ_cf)``: a conditional logit over per-category history
    features (:mod:`shared_model.interest_features`) with weights θ shared by all categories
    plus a per-category correction δ (both start at zero). Features ``[..., C, F]``."""

    def __init__(self, num_categories: int, num_features: int):
        super().__init__()
        self.shared = nn.Parameter(torch.zeros(num_features))
        self.per_category = nn.Parameter(torch.zeros(num_categories, num_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features * (self.shared + self.per_category)).sum(-1)


@register_grad_sampler(HistoryFeatureHead)
def _history_head_grad_sample(layer: HistoryFeatureHead, activations: list[torch.Tensor], backprops: torch.Tensor):
    f = activations[0].to(backprops.dtype)  # [B, ..., C, F]
    g = backprops.unsqueeze(-1) * f  # [B, ..., C, F]
    per_category = g.reshape(g.shape[0], -1, *g.shape[-2:]).sum(1)  # [B, C, F]
    return {layer.shared: per_category.sum(1), layer.per_category: per_category}
