"""Agreement between two labellings of the same items (derived interests vs a real taxonomy).

* Adjusted Rand index: Hubert & Arabie (1985), "Comparing partitions", J. Classification 2:193–218.
  1 for identical partitions, 0 in expectation for independent ones (can be negative).
* Purity: Manning, Raghavan & Schütze (2008), *Introduction to Information Retrieval*, §16.3 —
  the share of items in their cluster's majority class.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from math import comb


def _pairs(counts: Sequence[int]) -> int:
    return sum(comb(n, 2) for n in counts)


def adjusted_rand_index(truth: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    """ARI of two labellings of the same items (Hubert & Arabie 1985)."""
    if len(truth) != len(pred):
        raise ValueError(f"labellings differ in length: {len(truth)} vs {len(pred)}")
    n = len(truth)
    if n < 2:
        raise ValueError("the adjusted Rand index needs at least 2 items")
    index = _pairs(list(Counter(zip(truth, pred)).values()))
    rows, cols = _pairs(list(Counter(truth).values())), _pairs(list(Counter(pred).values()))
    expected = rows * cols / comb(n, 2)
    best = (rows + cols) / 2
    if best == expected:  # both partitions trivial (all one class or all singletons) and equal
        return 1.0
    return (index - expected) / (best - expected)


def purity(truth: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    """Share of items that belong to their predicted cluster's majority true class."""
    if len(truth) != len(pred) or not truth:
        raise ValueError("purity needs two non-empty labellings of the same items")
    by_cluster: dict[Hashable, Counter] = {}
    for t, p in zip(truth, pred):
        by_cluster.setdefault(p, Counter())[t] += 1
    return sum(max(c.values()) for c in by_cluster.values()) / len(truth)
