"""Per-category features of a user's own history for the next-interest head.

The head is a conditional logit (McFadden, 1974, "Conditional logit analysis of
qualitative choice behavior"): ``logit_c = W·h + b_c + θ·f_c(history)``, where ``h`` is the
user vector and ``f_c`` are four features of category c computed from the example's own
history and the public catalogue:

* ``last``: 1 if c is the category of the last labelled event;
* ``share-recent``: c's share among the labelled events of the last ``k`` events;
* ``share-all``: c's share among all labelled events;
* ``recency``: c's share with weights ``0.7^age`` (age 0 = newest event).

θ has four coordinates shared by all categories, so DP-SGD learns it from a strong
signal with little noise. What the features brought when they were added is in
docs/model.md ("The text tower").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared_model.schema import Catalogue, Event

FEATURES = ("last", "share-recent", "share-all", "recency")
RECENCY_DECAY = 0.7


def history_features(
    history: Sequence[Event], catalogue: Catalogue, category_index: dict[str, int], k: int
) -> torch.Tensor:
    """``[C, 4]`` features (:data:`FEATURES`) of each category for one history."""
    out = torch.zeros(len(category_index), len(FEATURES))
    labels = [category_index.get(catalogue.items[e.item_id].interest or "") for e in history]
    labelled = [c for c in labels if c is not None]
    if not labelled:
        return out
    out[labelled[-1], 0] = 1.0
    recent = [c for c in labels[-k:] if c is not None]
    for c in recent:
        out[c, 1] += 1.0 / len(recent)
    for c in labelled:
        out[c, 2] += 1.0 / len(labelled)
    total = 0.0
    for age, c in enumerate(reversed(labels)):
        if c is not None:
            w = RECENCY_DECAY**age
            out[c, 3] += w
            total += w
    out[:, 3] /= total
    return out


def sequence_features(cats: torch.Tensor, num_categories: int, k: int) -> torch.Tensor:
    """``[B, T, C, 4]``: :func:`history_features` of every prefix of a batch of sequences at
    once; position t's features describe events ``0 … t`` (the history before the event at
    ``t + 1``).

    ``cats`` ``[B, T]``: each event's category index, ``num_categories`` for an unlabelled
    item, −1 for padding (padding comes first: sequences are right-aligned)."""
    b, t = cats.shape
    c = num_categories
    onehot = torch.zeros(b, t, c + 1)
    real = cats >= 0
    onehot[real] = torch.nn.functional.one_hot(cats[real], c + 1).float()
    labelled = onehot[..., :c]  # [B, T, C]; unlabelled and padding rows are zero
    out = torch.zeros(b, t, c, len(FEATURES))
    # last: the category of the newest labelled event so far
    last = torch.zeros(b, c)
    recency = torch.zeros(b, c)
    norm = torch.zeros(b, 1)
    for pos in range(t):
        row = labelled[:, pos]
        has = row.sum(-1, keepdim=True) > 0
        last = torch.where(has, row, last)
        out[:, pos, :, 0] = last
        step = real[:, pos].float().unsqueeze(1)  # padding does not age the history
        decay = torch.where(step > 0, torch.full_like(step, RECENCY_DECAY), torch.ones_like(step))
        recency = recency * decay + row
        norm = norm * decay + has.float()
        out[:, pos, :, 3] = recency / norm.clamp_min(1e-12)
    cum = labelled.cumsum(1)
    out[..., 2] = cum / cum.sum(-1, keepdim=True).clamp_min(1e-12)
    # share-recent: labelled events among the last k events (padding is never counted)
    window = cum - torch.nn.functional.pad(cum, (0, 0, k, 0))[:, :t]
    out[..., 1] = window / window.sum(-1, keepdim=True).clamp_min(1e-12)
    return out
