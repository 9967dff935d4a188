"""The sequence model's training loss: one example is one user's whole window, with a loss at
every position (the next item and the next interest), averaged over the example's positions.

Privacy argument (user-level DP-SGD, Abadi et al. 2016): an example's loss depends only on
that user's own events and public data — the public catalogue's item vectors, candidates
drawn from the public catalogue (never other users' items), and the already-released (and
already charged) popularity prior and transition counts, from which the user's *own*
released pairs are subtracted (:meth:`SequenceModel.transition_entries`).

Next item: a softmax over each position's own target (column 0) and the ``candidates``
shared by the batch — the whole platform catalogue (``num-negatives = 0``), or a uniform
sample of it (on a region silo: of each of its platforms, and a position counts only the
candidates on its target's platform); a shared candidate equal to the target, or in the history before the position,
is excluded, as evaluation excludes history items. Next interest: cross-entropy of the
platform-masked next-interest logits against the next event's category (unlabelled: none;
on a region silo masked to the target's platform).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared_model.model import category_prior, mask_to_platform
from shared_model.sequence_model import Candidates, SequenceInput, SequenceModel


@dataclass
class ItemSpace:
    """Public per-item tensors of the item tower, in item-row order, and the silo's platform
    rows. A region silo (several platforms) also gives ``item_platform`` ``[N]`` (the index of
    each row's platform among the catalogue's platforms) and ``platform_masks`` ``[P, C]``
    (each platform's classes): a position is then scored only against items and classes of
    its target's platform, and a model with an other-platform pool reads the history by it."""

    vectors: torch.Tensor  # [N, H]
    category: torch.Tensor  # [N] category index (C: unlabelled)
    platform_rows: torch.Tensor  # [N_p] the silo's platforms' rows
    category_mask: torch.Tensor  # [C] the silo's platforms' categories
    item_platform: torch.Tensor | None = None  # [N], region silos only
    platform_masks: torch.Tensor | None = None  # [P, C], region silos only

    def with_platforms(self, inp: SequenceInput) -> tuple[SequenceInput, torch.Tensor | None]:
        """``inp`` with each event's platform, and each position's target platform ``[B, T]``
        (the next event's; the last position its own), on a region silo; else ``(inp, None)``."""
        if self.item_platform is None:
            return inp, None
        plat = torch.where(inp.rows >= 0, self.item_platform[inp.rows.clamp_min(0)], torch.full_like(inp.rows, -1))
        target = torch.cat([plat[:, 1:], plat[:, -1:]], dim=1)
        return SequenceInput(inp.rows, inp.vectors, inp.cats, inp.features, plat), target

    def target_platforms(self, targets: torch.Tensor) -> torch.Tensor | None:
        """``[B, P]`` each position's target platform (None on a one-platform silo)."""
        if self.item_platform is None:
            return None
        return self.item_platform[targets.clamp_min(0)]

    def class_masks(self, targets: torch.Tensor) -> torch.Tensor:
        """The classes each position may predict: ``[C]`` (one platform) or ``[B, P, C]``."""
        tp = self.target_platforms(targets)
        if tp is None or self.platform_masks is None:
            return self.category_mask
        return self.platform_masks[tp.clamp_min(0)]

    def other_platform(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """``[B, P, M]``: shared candidates ``rows`` ``[M]`` (or a position's own ``[B, P, K]``)
        on another platform than the position's target; None on a one-platform silo."""
        tp = self.target_platforms(targets)
        if tp is None:
            return None
        assert self.item_platform is not None
        cp = self.item_platform[rows.clamp_min(0)]
        return (cp.view(1, 1, -1) if rows.dim() == 1 else cp) != tp.unsqueeze(-1)

    def candidates(self, model: SequenceModel, rows: torch.Tensor, targets: torch.Tensor | None = None) -> Candidates:
        device = self.vectors.device
        rows = rows.to(device)
        return Candidates(rows, self.vectors[rows], model.log_priors(rows), self.category[rows],
                          None if targets is None else targets.to(device),
                          None if targets is None else self.category[targets.clamp_min(0).to(device)])


def first_seen(rows: torch.Tensor, cands: Candidates) -> torch.Tensor:
    """``[B, M]`` the first window position at which each shared candidate occurs in the
    example's window (T where it never does)."""
    b, t = rows.shape
    size = int(max(int(rows.max()) if rows.numel() else 0, int(cands.rows.max()) if len(cands.rows) else 0)) + 1
    colmap = torch.full((size,), -1, dtype=torch.long, device=rows.device)
    colmap[cands.rows] = torch.arange(len(cands.rows), device=rows.device)
    col = torch.where(rows >= 0, colmap[rows.clamp_min(0)], torch.full_like(rows, -1))
    pos = torch.arange(t, device=rows.device).expand(b, t)
    first = torch.full((b, len(cands.rows) + 1), t, dtype=torch.long, device=rows.device)
    first.scatter_reduce_(1, torch.where(col >= 0, col, torch.full_like(col, len(cands.rows))), pos, "amin")
    return first[:, :-1]


def hardest(model: SequenceModel, q: torch.Tensor, inp: SequenceInput, items: ItemSpace, targets: torch.Tensor,
            positions: torch.Tensor, top_k: int, logp: torch.Tensor | None, category_prior_weight: float,
            own_pairs: torch.Tensor | None, pool: torch.Tensor) -> tuple[Candidates, torch.Tensor]:
    """Each position's ``top_k`` highest-scoring items of ``pool`` (platform rows: the catalogue,
    or a uniform sample of it; on a region silo only the pool's items on the position's target
    platform, each platform's positions scored apart) under the current model, history and the
    target excluded as in evaluation, as its own candidates; and whether the target itself
    scores within them (``[B, P]``). Scored without gradient. Among a sample of a fraction f of the catalogue, the
    top k stand for about the top k/f of the whole catalogue."""
    with torch.no_grad():
        qd = q.detach()
        own = model.item_scores(qd, inp, own_target(items, targets), positions, logp, category_prior_weight, own_pairs,
                                target_vectors=inp.vectors[:, 1:])[..., 0]  # [B, P]
        values = own.new_full((*own.shape, top_k), float("-inf"))
        rows = torch.full(values.shape, -1, dtype=torch.long, device=own.device)
        for part, only in _platform_parts(items, pool, targets):  # a region silo: each platform's positions apart
            full = items.candidates(model, part)
            shared = model.shared_scores(qd, inp, full, positions, logp, category_prior_weight, own_pairs, only)
            shared.masked_fill_(_excluded(inp, full, targets, positions), float("-inf"))  # [B, P, M]
            top = shared.topk(min(top_k, shared.shape[-1]), dim=-1)
            found = torch.where(torch.isfinite(top.values), part.to(top.indices.device)[top.indices],
                                torch.full_like(top.indices, -1))
            k = top.values.shape[-1]
            if only is None:
                values[..., :k], rows[..., :k] = top.values, found
            else:
                values[only, :k], rows[only, :k] = top.values[only], found[only]
        # fewer than top_k items score above the target ⇔ the k-th highest does not (−inf: fewer than k items)
        near = values[..., -1] <= own
    safe = rows.clamp_min(0)
    cands = Candidates(rows, items.vectors[safe], model.log_priors(safe), items.category[safe], targets,
                       items.category[targets.clamp_min(0)])
    return cands, near


def _platform_parts(items: ItemSpace, pool: torch.Tensor, targets: torch.Tensor,
                    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``[(pool, None)]`` on a one-platform silo; on a region silo each platform's share of the
    pool with the positions ``[B, P]`` whose target is on that platform, so a position is
    scored only against its target platform's sample (half the work of masking the rest)."""
    tp = items.target_platforms(targets)
    if tp is None:
        return [(pool, None)]
    assert items.item_platform is not None
    pool_platform = items.item_platform[pool.to(items.item_platform.device)].to(pool.device)
    return [(pool[pool_platform == p], tp == p) for p in torch.unique(pool_platform).tolist()]


def own_target(items: ItemSpace, targets: torch.Tensor) -> Candidates:
    """Candidates that are each position's target alone (column 0, width 1)."""
    b, t = targets.shape
    none = targets.new_zeros(b, t, 0)
    return Candidates(none, items.vectors.new_zeros(b, t, 0, items.vectors.shape[-1]), none.float(), none, targets,
                      items.category[targets.clamp_min(0)])


def _excluded(inp: SequenceInput, cands: Candidates, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[B, P, M]`` shared candidates a position must not count: a second copy of its target, and
    the items of its history (window positions up to it)."""
    return (cands.rows.view(1, 1, -1) == targets.unsqueeze(-1)) | (
        first_seen(inp.rows, cands).unsqueeze(1) <= positions.view(1, -1, 1))


def sequence_loss(model: torch.nn.Module, inp: SequenceInput, own_pairs: torch.Tensor | None, items: ItemSpace,
                  shared_rows: torch.Tensor, item_weight: float = 1.0, category_weight: float = 1.0,
                  category_prior_weight: float = 0.0, top_k: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the batch of each example's mean loss over its positions (see the module
    docstring); ``model`` may be wrapped by Opacus. With ``top_k`` > 0 the next-item term is the
    top-k loss instead: a softmax over the target and the position's ``top_k`` hardest items
    among ``shared_rows`` (:func:`hardest`), counted only at positions whose target already ranks
    within them. Returns ``(loss, {"item": …, "category": …,
    "positions": …})`` (means over positions, for logging)."""
    inner: SequenceModel = getattr(model, "_module", model)
    b, t = inp.rows.shape
    if t < 2:
        raise ValueError("a training window needs at least two events")
    positions = torch.arange(t - 1, device=inp.rows.device)
    valid = (inp.cats[:, :-1] >= 0) & (inp.cats[:, 1:] >= 0) & (inp.rows[:, 1:] >= 0)  # [B, T-1]
    targets = inp.rows[:, 1:]
    inp, target_platform = items.with_platforms(inp)
    q_all = inner.queries(inp, target_platform)
    q = q_all[:, :-1]
    logits = inner.interest_logits(q_all, inp.features)[:, :-1]
    classes = items.class_masks(targets)  # [C], or [B, T-1, C] on a region silo
    logits = mask_to_platform(logits, classes)
    logp = category_prior(logits.detach()) if category_prior_weight else None
    if top_k:
        cands, near = hardest(inner, q, inp, items, targets, positions, top_k, logp, category_prior_weight, own_pairs,
                              shared_rows)
        valid_item = valid & near
        drop = cands.rows < 0  # a position with fewer than top_k items left
    else:
        cands = items.candidates(inner, shared_rows, targets=targets)
        valid_item = valid
        drop = _excluded(inp, cands, targets, positions)
        if (other := items.other_platform(shared_rows, targets)) is not None:
            drop = drop | other
    scores = inner.item_scores(q, inp, cands, positions, logp, category_prior_weight, own_pairs,
                               target_vectors=inp.vectors[:, 1:])
    scores = torch.cat([scores[..., : cands.offset], scores[..., cands.offset:].masked_fill(drop, float("-inf"))], dim=-1)
    item_ce = -torch.log_softmax(scores.float(), dim=-1)[..., 0]  # [B, T-1]
    item_ce = torch.where(valid_item, item_ce, torch.zeros_like(item_ce))
    next_cat = inp.cats[:, 1:]
    labelled = valid & (next_cat < logits.shape[-1])
    cat_ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                             torch.where(labelled, next_cat, classes.int().argmax(-1).expand_as(next_cat)).reshape(-1),
                             reduction="none").view(b, t - 1)
    cat_ce = torch.where(labelled, cat_ce, torch.zeros_like(cat_ce))
    n = valid.sum(1).clamp_min(1)
    per_example = (item_weight * torch.where(valid, item_ce, torch.zeros_like(item_ce)).sum(1)
                   + category_weight * cat_ce.sum(1)) / n
    total = valid.sum().clamp_min(1)
    with torch.no_grad():
        stats = {"item": float(torch.where(valid, item_ce, torch.zeros_like(item_ce)).sum() / total),
                 "category": float(cat_ce.sum() / labelled.sum().clamp_min(1)), "positions": float(valid.sum())}
    return per_example.sum() / max(b, 1), stats
