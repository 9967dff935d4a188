"""The sequence model: a user tower that reads the history as a sequence of item vectors.

Items are vectors of the item tower (the frozen base encoder's, :mod:`shared_model.item_index`);
a history is the sequence of its last ``max-history`` items' vectors, right-aligned in a
``[B, T]`` window (padding first). At every position t the model scores the next item:

* **query** ``q_t``: :class:`~shared_model.sequence_layers.RecencyPool` over the last
  ``history-lags`` item vectors (starts as the newest item's vector); with
  ``other-platform-lags`` > 0 (region silos, whose histories mix platforms) the last
  ``history-lags`` items on the position's TARGET platform instead, plus a
  :class:`~shared_model.sequence_layers.LagPool` over the last ``other-platform-lags`` items
  on the other platforms (weights starting at 0): the untrained query is the newest item on
  the platform being scored, as on a platform silo (with none on it yet, the newest items of
  any platform, the query then scaled by a learned ``exp(c)``, :class:`ColdScale`, starting at 1);
* **next item**: :class:`~shared_model.sequence_layers.ScoreHead` — ``s·cos(q_t, e_j)`` with a
  learned temperature, plus the DP popularity prior and the DP item-transition counts of the
  history's newest ``transition-lags`` items with j (:class:`~shared_model.transition_index.TransitionIndex`), each with a
  trained weight; optionally ``category-prior-weight · log p(category(j))`` from the
  next-interest head, detached (a fixed term, never trained through the item loss);
* **next interest**: ``category_head(q_t)`` on the *detached* query plus
  :class:`~shared_model.sequence_layers.HistoryFeatureHead` over the per-position history
  features, so the next-interest loss never moves the item ranking (issue #23, item 5).

Every trainable tensor is small (a few hundred numbers and the category head), which is what
lets DP-SGD run at large batches with little noise per coordinate: docs/model.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from shared_model.interest_features import FEATURES
from shared_model.model import PopularityPrior
from shared_model.sequence_layers import (ColdScale, HistoryFeatureHead, LagPool, RecencyPool, ScoreHead,
                                         platform_streams)
from shared_model.transition_index import TransitionIndex

if TYPE_CHECKING:
    from shared_model.config import RunConfig


@dataclass
class SequenceInput:
    """A batch of right-aligned item windows: ``rows`` ``[B, T]`` item rows (−1: padding or an
    item outside the index), ``vectors`` ``[B, T, H]`` their item vectors (0 at padding),
    ``cats`` ``[B, T]`` category indices (C: unlabelled, −1: padding), ``features``
    ``[B, T, C, F]`` the per-position history features; optionally ``platforms`` ``[B, T]``
    each event's platform (its index in the catalogue's platforms, −1 unknown), which a model
    with an other-platform pool reads when told each position's target platform."""

    rows: torch.Tensor
    vectors: torch.Tensor
    cats: torch.Tensor
    features: torch.Tensor
    platforms: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        return self.cats >= 0

    def to(self, device: torch.device) -> "SequenceInput":
        return SequenceInput(self.rows.to(device), self.vectors.to(device), self.cats.to(device),
                             self.features.to(device), None if self.platforms is None else self.platforms.to(device))


@dataclass
class Candidates:
    """The items a batch's positions are scored against: ``rows`` ``[M]`` shared by every
    position (the platform's catalogue, or a sample of it) or ``[B, P, K]``, each position's own
    (its hardest negatives, :func:`shared_model.sequence_loss.sequence_loss`), with their
    ``vectors`` ``[..., H]``, ``log_prior`` and ``category`` (C: unlabelled) of the same leading
    shape; and optionally each position's own target (``targets`` ``[B, T]``, scored in column 0
    before the others)."""

    rows: torch.Tensor
    vectors: torch.Tensor
    log_prior: torch.Tensor
    category: torch.Tensor
    targets: torch.Tensor | None = None
    target_categories: torch.Tensor | None = None  # [B, T], with ``targets``

    @property
    def offset(self) -> int:
        return 0 if self.targets is None else 1

    @property
    def shared(self) -> bool:
        return self.rows.dim() == 1

    @property
    def width(self) -> int:
        return self.rows.shape[-1] + self.offset


class SequenceModel(nn.Module):
    """See the module docstring. ``forward`` is not used; the scoring entry points are
    :meth:`queries`, :meth:`interest_logits` and :meth:`item_scores`."""

    def __init__(self, hidden: int, num_categories: int, *, history_lags: int, logit_scale: float,
                 popularity_weight: float | None, transition_weight: float | None, transition_lags: int,
                 history_features: bool = True, adaptor_rank: int = 0, other_platform_lags: int = 0):
        super().__init__()
        self.pool = RecencyPool(history_lags)
        self.other_pool = LagPool(other_platform_lags) if other_platform_lags else None
        self.cold_scale = ColdScale() if other_platform_lags else None
        if adaptor_rank:  # q + V·U·q: a learned linear item adaptor (see :meth:`queries`), V starts at 0
            self.adaptor_down = nn.Linear(hidden, adaptor_rank, bias=False)
            self.adaptor_up = nn.Linear(adaptor_rank, hidden, bias=False)
            nn.init.zeros_(self.adaptor_up.weight)
        else:
            self.adaptor_down = self.adaptor_up = None
        self.scorer = ScoreHead(logit_scale, popularity_weight, transition_weight, transition_lags)
        self.category_head = nn.Linear(hidden, num_categories)
        nn.init.zeros_(self.category_head.bias)
        self.history_head = HistoryFeatureHead(num_categories, len(FEATURES)) if history_features else None
        self.popularity_prior = PopularityPrior() if popularity_weight is not None else None
        self.transition_table = TransitionIndex() if transition_weight is not None else None

    def queries(self, inp: SequenceInput, target: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, H]`` unit query vectors at every position (0 where the window is empty).

        With an other-platform pool, ``inp.platforms`` and ``target`` ``[B, T]`` (each
        position's target platform) the query pools the position's target-platform stream and
        its other-platform stream (:func:`~shared_model.sequence_layers.platform_streams`);
        otherwise the window as it is (the other-platform pool then adds 0).

        With ``item-adaptor-rank`` r > 0 the pooled vector p becomes ``p + V·U·p`` (rank r,
        V starting at zero), so ``cos(q, e_j)`` is a learned bilinear similarity
        ``p·(I + VU)ᵀ e_j``: a linear adaptor of the candidates' item vectors applied on the
        query side, where every example's gradient stays its own (the candidates are shared)."""
        cold = None
        if self.other_pool is not None and inp.platforms is not None and target is not None:
            same, other, cold = platform_streams(inp.vectors, inp.platforms, inp.valid, target, self.pool.lags,
                                                 self.other_pool.lags)
            pooled = self.pool(same) + self.other_pool(other)
        else:
            pooled = self.pool(inp.vectors)
            if self.other_pool is not None:  # called with nothing, so every step has its (zero) per-sample gradient
                b, t, h = inp.vectors.shape
                pooled = pooled + self.other_pool(inp.vectors.new_zeros(1, 1, 1, 1).expand(b, t, self.other_pool.lags, h))
        if self.adaptor_down is not None and self.adaptor_up is not None:
            pooled = pooled + self.adaptor_up(self.adaptor_down(pooled))
        q = F.normalize(pooled, dim=-1, eps=1e-8)
        if self.cold_scale is not None:  # called on every step (zero gradient without cold positions)
            q = self.cold_scale(q, cold if cold is not None else torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device))
        return q

    def interest_logits(self, q: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``[B, T, C]`` next-interest logits; the query is detached (no gradient into the ranking)."""
        logits = self.category_head(F.normalize(q.detach(), dim=-1, eps=1e-8))  # unit: a cold-start scale is the items' only
        if self.history_head is not None:
            logits = logits + self.history_head(features.to(logits.dtype))
        return logits

    def log_priors(self, rows: torch.Tensor) -> torch.Tensor:
        return self.popularity_prior.lookup(rows) if self.popularity_prior is not None else torch.zeros(rows.shape, device=rows.device)

    def item_scores(self, q: torch.Tensor, inp: SequenceInput, cands: Candidates, positions: torch.Tensor,
                    category_logp: torch.Tensor | None = None, category_weight: float = 0.0,
                    own_pairs: torch.Tensor | None = None, target_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, P, width]`` scores of the candidates at the window positions ``positions`` ``[P]``.

        ``q`` ``[B, P, H]`` are the queries at those positions; ``target_vectors`` ``[B, P, H]``
        the targets' item vectors when ``cands.targets`` is set (column 0); ``own_pairs``
        ``[B, m, 2]`` (training only): the example's own released transition pairs (item rows,
        −1 padding), subtracted from the counts (leave-one-out: the count an example
        is scored with is the other users'); ``category_logp`` ``[B, P, C+1]`` detached
        log-probabilities for the optional category term."""
        b, p = q.shape[:2]
        scored = category_logp is not None and bool(category_weight)
        cat_term = None
        if cands.shared:  # the shared columns' prior and category terms broadcast, never copied per position
            cos = q @ cands.vectors.T.to(q.dtype)  # [B, P, M]
            prior = self.log_priors(cands.rows).to(q.device).view(1, 1, -1)
            if scored:
                cat_term = category_logp.index_select(-1, cands.category.to(q.device))
        else:  # each position's own candidates
            cos = torch.einsum("bph,bpkh->bpk", q, cands.vectors.to(q.dtype))
            prior = self.log_priors(cands.rows.clamp_min(0)).to(q.device)
            if scored:
                cat_term = category_logp.gather(2, cands.category.to(q.device))
        if cands.targets is not None:
            assert target_vectors is not None and cands.target_categories is not None
            own = (q * target_vectors).sum(-1, keepdim=True)
            cos = torch.cat([own, cos], dim=-1)
            prior = torch.cat([self.log_priors(cands.targets[:, positions].clamp_min(0)).unsqueeze(-1).to(q.device),
                               prior.expand(b, p, -1)], dim=-1)
            if cat_term is not None:
                own_cat = category_logp.gather(2, cands.target_categories[:, positions].unsqueeze(-1).to(q.device))
                cat_term = torch.cat([own_cat, cat_term], dim=-1)
        index, lag, count = self.transition_entries(inp, cands, positions, own_pairs)
        scores = self.scorer(cos, prior.contiguous(), index, lag, count)
        if cat_term is not None:
            scores = scores + category_weight * cat_term
        return scores

    def shared_scores(self, q: torch.Tensor, inp: SequenceInput, cands: Candidates, positions: torch.Tensor,
                      category_logp: torch.Tensor | None = None, category_weight: float = 0.0,
                      own_pairs: torch.Tensor | None = None, only: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`item_scores` of shared candidates without targets, ``[B, P, M]``, scored without
        gradient for many positions at once (the top-k loss's hardest items): the text, popularity
        and category terms in one matrix product, ``[s·q, w_p, w_c·log p(c)] · [e_j, log prior_j,
        onehot(c_j)]``, and the transition term added where the table has entries. The same
        figures as :meth:`item_scores` up to float rounding, without its per-position copies of
        each shared column. Building the right-hand matrix costs a copy of the candidates' vectors,
        so a few queries (serving one user) are cheaper through :meth:`item_scores`.

        ``only`` ``[B, P]`` bool: score just those positions (a region silo's positions whose
        target is on the candidates' platform); the others are −inf and cost nothing."""
        if not cands.shared or cands.targets is not None:
            raise ValueError("shared_scores takes shared candidates without targets")
        b, p = q.shape[:2]
        head = self.scorer
        left = [q * head.scale.to(q.dtype)]
        right = [cands.vectors.to(q.dtype)]
        if head.popularity_weight is not None:
            left.append(head.popularity_weight.to(q.dtype).expand(b, p, 1))
            right.append(self.log_priors(cands.rows).to(q.device, q.dtype).view(-1, 1))
        extra = None
        if category_logp is not None and category_weight:
            cats = cands.category.to(q.device)
            used, column = torch.unique(cats, return_inverse=True)
            logp = category_logp.index_select(-1, used).to(q.dtype)
            scored = logp if only is None else logp[only]
            if bool(torch.isfinite(scored).all()):  # a one-hot product is exact only over finite log p
                left.append(category_weight * logp)
                right.append(F.one_hot(column, len(used)).to(q.dtype))
            else:
                extra = category_weight * category_logp.index_select(-1, cats)
        lhs, rhs = torch.cat(left, -1), torch.cat(right, -1)
        if only is None:
            scores = lhs @ rhs.T  # [B, P, M]
            if extra is not None:
                scores = scores + extra
        else:
            scores = lhs.new_full((b, p, rhs.shape[0]), float("-inf"))
            scores[only] = lhs[only] @ rhs.T + (0.0 if extra is None else extra[only])
        index, lag, count = self.transition_entries(inp, cands, positions, own_pairs)
        if head.transition_weight is not None and index.numel():
            slot = index >= 0
            example = torch.arange(b, device=index.device).unsqueeze(1).expand_as(index)[slot]
            key = example * (p * cands.width) + index[slot]
            keys, at = torch.unique(key, return_inverse=True)
            mass = torch.zeros(len(keys), dtype=scores.dtype, device=scores.device).index_add_(
                0, at, (head.transition_lags.exp()[lag[slot]] * count[slot]).to(scores.dtype))
            scores = scores.reshape(-1).index_add(0, keys, head.transition_weight.to(scores.dtype) * torch.log1p(mass))
            scores = scores.view(b, p, -1)
        return scores

    def transition_entries(self, inp: SequenceInput, cands: Candidates, positions: torch.Tensor,
                           own_pairs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sparse transition counts ``(index, lag, count)`` ``[B, E]`` of :class:`ScoreHead`:
        for each query position p (the p-th of ``positions``) and lag l, the stored pairs of the
        item at window position ``positions[p] − l`` with the candidates (index
        ``p·width + column``; −1 pads). Shared candidates are found through the table's rows
        (:meth:`TransitionIndex.neighbours`), a position's own ones by pair lookup."""
        device = inp.rows.device
        table = self.transition_table
        b = inp.rows.shape[0]
        empty = torch.zeros(b, 0, dtype=torch.long, device=device)
        if table is None or not table.has_table or self.scorer.transition_lags is None:
            return empty, empty, empty.float()
        lags = self.scorer.transition_lags.numel()
        npos = len(positions)
        src_pos = positions.view(1, -1, 1) - torch.arange(lags, device=device).view(1, 1, -1)  # [1, P, L]
        src = inp.rows.gather(1, src_pos.clamp_min(0).expand(b, -1, -1).reshape(b, -1)).view(b, npos, lags)
        src = torch.where(src_pos.expand_as(src) >= 0, src, torch.full_like(src, -1))
        flat = src.reshape(-1)  # one entry per (example, position, lag)
        owners, cols, counts, partners = [], [], [], []
        if cands.shared:  # every stored pair of the source item that is a candidate
            owner, j, count = table.neighbours(flat)
            size = max(table.size, int(cands.rows.max()) + 1 if len(cands.rows) else 0)
            colmap = torch.full((size,), -1, dtype=torch.long, device=device)
            colmap[cands.rows.to(device)] = torch.arange(len(cands.rows), device=device) + cands.offset
            col = colmap[j]
            keep = col >= 0
            owners, cols, counts, partners = [owner[keep]], [col[keep]], [count[keep]], [j[keep]]
        own_cols = [] if cands.targets is None else [cands.targets[:, positions].to(device).unsqueeze(-1)]
        if not cands.shared:
            own_cols.append(cands.rows.to(device))
        if own_cols:  # each position's own candidates (its target, its hard negatives): pair lookups
            rows = torch.cat(own_cols, dim=-1)  # [B, P, W]
            width = rows.shape[-1]
            pairs_src = src.unsqueeze(-1).expand(-1, -1, -1, width)  # [B, P, L, W]
            pairs_dst = rows.unsqueeze(2).expand(-1, -1, lags, -1)
            found = table.lookup(pairs_src.reshape(-1), pairs_dst.reshape(-1))
            hit = (found != 0).nonzero().flatten()
            owners.append(hit // width)
            cols.append(hit % width)
            counts.append(found[hit])
            partners.append(pairs_dst.reshape(-1)[hit])
        owner, col, count, j = (torch.cat(x) for x in (owners, cols, counts, partners))
        i = flat[owner]
        example = owner // (npos * lags)
        if own_pairs is not None and own_pairs.numel():  # leave-one-out
            n_items = table.size
            size = max(n_items, 1)
            op = own_pairs.to(device)
            inside = ((op >= 0) & (op < n_items)).all(-1)
            own_keys = torch.where(inside, op.min(-1).values * size + op.max(-1).values, torch.full_like(op[..., 0], -1))
            key = torch.minimum(i, j) * size + torch.maximum(i, j)
            mine = (own_keys[example] == key.unsqueeze(1)).any(1)
            count = count - mine.float()
        keep = count > 0
        owner, col, count, example = owner[keep], col[keep], count[keep], example[keep]
        position = (owner // lags) % npos
        lag = owner % lags
        index = position * cands.width + col
        return _pad_by_example(example, b, index, lag, count)


def _pad_by_example(example: torch.Tensor, b: int, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Entries grouped by example into ``[B, E_max]`` arrays (index −1, lag 0, count 0 as padding)."""
    per = torch.bincount(example, minlength=b)
    width = int(per.max()) if len(per) and per.numel() else 0
    order = torch.argsort(example, stable=True)
    example = example[order]
    slot = torch.arange(len(example), device=example.device) - (torch.cumsum(per, 0) - per)[example]
    out = []
    for n, v in enumerate(values):
        fill = -1 if n == 0 else 0
        padded = torch.full((b, width), fill, dtype=v.dtype, device=v.device)
        padded[example, slot] = v[order]
        out.append(padded)
    return tuple(out)


def build_sequence_model(cfg: "RunConfig", num_categories: int, seed: int | None = None) -> SequenceModel:
    """A fresh sequence model for ``cfg``, its random tensors (the category head) drawn from
    ``seed`` (default ``cfg.seed``), so every silo and the server build the same initial model."""
    from transformers import AutoConfig

    from shared_model.encoder import resolve_base_model

    hidden = AutoConfig.from_pretrained(str(resolve_base_model(cfg.base_model)), local_files_only=True).hidden_size
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed if seed is None else seed)
    try:
        return SequenceModel(hidden, num_categories, history_lags=cfg.history_lags, logit_scale=cfg.logit_scale,
                             popularity_weight=cfg.popularity_weight if cfg.popularity_prior else None,
                             transition_weight=cfg.transition_weight if cfg.transitions else None,
                             transition_lags=cfg.transition_lags, history_features=cfg.history_features,
                             adaptor_rank=cfg.item_adaptor_rank, other_platform_lags=cfg.other_platform_lags)
    finally:
        torch.random.set_rng_state(state)


@torch.inference_mode()
def last_position_scores(model: SequenceModel, inp: SequenceInput, cands: Candidates, category_mask: torch.Tensor | None,
                         category_prior_weight: float = 0.0, target_platform: int | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, M] next-item scores of the shared candidates, [B, C] next-interest logits)`` at
    each window's last position (the history's newest event), logits masked to
    ``category_mask``'s categories (``None``: unmasked); ``target_platform``: the index of the
    candidates' platform (a model with an other-platform pool reads the history by it)."""
    from shared_model.model import category_prior, mask_to_platform

    t = inp.rows.shape[1]
    position = torch.tensor([t - 1], device=inp.rows.device)
    target = None if target_platform is None else torch.full_like(inp.rows, int(target_platform))
    q = model.queries(inp, target)[:, -1:]
    logits = model.interest_logits(q, inp.features[:, -1:])
    if category_mask is not None:
        logits = mask_to_platform(logits, category_mask)
    logp = category_prior(logits) if category_prior_weight else None
    scores = model.item_scores(q, inp, cands, position, logp, category_prior_weight)
    return scores[:, 0], logits[:, 0]
