"""The migration score: how far a predicted next-interest distribution moves away from
the user's recent interests.

``recent_distribution``: the empirical distribution of the interest classes (docs/data-format.md) of the
user's last ``k`` events on the target's platform (unlabelled events ignored; k = ``migration-k``,
5 by default, the same window that defines the migration flag in :mod:`shared_model.examples`,
:func:`shared_model.examples.same_platform`). On a one-platform history that is its last ``k``
events; a region silo's history mixes platforms, whose classes differ, so the other platforms'
events are left out when the ``target`` is given.

``migration_score`` = Jensen–Shannon divergence, base 2, between the predicted
next-interest distribution ``p`` and that recent distribution ``q``:
``JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``m = ½ (p + q)``. It lies in [0, 1]: 0 when
the model expects the user to continue exactly their recent mix, 1 when it puts all mass
on categories the user has not touched in the last k events. Undefined (NaN) when no
recent event has an interest label.

``new_interest``: *where* a user goes if they move — the most probable category outside
the recent ones. The score says *whether*; an arg-max over all categories almost never
answers *where*, because staying is the likelier event for nearly every user.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared_model.examples import DEFAULT_K, same_platform
from shared_model.schema import Catalogue, Event


def recent_events(history: Sequence[Event], catalogue: Catalogue, k: int = DEFAULT_K,
                  target: Event | None = None) -> list[Event]:
    """The last ``k`` events of ``history`` on ``target``'s platform (of the whole history without a target)."""
    events = list(history) if target is None else same_platform(history, target, catalogue)
    return events[-k:] if k > 0 else []


def recent_distribution(history: Sequence[Event], catalogue: Catalogue, categories: Sequence[str],
                        k: int = DEFAULT_K, target: Event | None = None) -> np.ndarray | None:
    """``[C]`` distribution of the interest classes of the last ``k`` events (on ``target``'s
    platform when given); None if none labelled."""
    index = {c: i for i, c in enumerate(categories)}
    q = np.zeros(len(categories), dtype=np.float64)
    for e in recent_events(history, catalogue, k, target):
        c = catalogue.items[e.item_id].interest if e.item_id in catalogue.items else None
        if c in index:
            q[index[c]] += 1.0
    total = q.sum()
    return q / total if total > 0 else None


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence in bits between rows of ``p`` and ``q`` (``[..., C]``), in [0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * (np.log2(a) - np.log2(np.where(b > 0, b, 1.0))), 0.0)
        return terms.sum(-1)

    return np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, 1.0)


def migration_score(predicted: np.ndarray, history: Sequence[Event], catalogue: Catalogue,
                    categories: Sequence[str], k: int = DEFAULT_K, target: Event | None = None) -> float:
    """JS divergence (bits) between ``predicted`` ``[C]`` and the recent distribution (on
    ``target``'s platform when given); NaN if undefined."""
    q = recent_distribution(history, catalogue, categories, k, target)
    if q is None:
        return float("nan")
    return float(js_divergence(predicted, q))


def outside_recent_mass(predicted: np.ndarray, history: Sequence[Event], catalogue: Catalogue,
                        categories: Sequence[str], k: int = DEFAULT_K, target: Event | None = None) -> float:
    """Predicted probability that the next category is *not* among the last ``k`` events'
    categories (on ``target``'s platform when given) — the model's own probability of the
    migration flag; NaN if undefined."""
    q = recent_distribution(history, catalogue, categories, k, target)
    if q is None:
        return float("nan")
    p = np.asarray(predicted, dtype=np.float64)
    return float(1.0 - p[q > 0].sum() / p.sum())


def new_interest(predicted: np.ndarray, recent: np.ndarray) -> int | None:
    """Index of the most probable category with ``recent == 0`` and positive predicted mass
    (the predicted new interest if the user leaves their recent categories); None when no
    category outside the recent ones has mass."""
    p = np.asarray(predicted, dtype=np.float64)
    outside = np.where((np.asarray(recent) > 0) | (p <= 0), -np.inf, p)
    if not np.isfinite(outside).any():
        return None
    return int(np.argmax(outside))
