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
docs/model-notes.md.
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
