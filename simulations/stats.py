"""Per-user evaluation metrics, ROC-AUC and the paired bootstrap over users.

Per-user values average to the aggregates of :mod:`shared_model.metrics` (ranks are
0-based; HR@k = [rank < k], NDCG@k = 1/log2(rank+2) if rank < k, RR = 1/(rank+1)), so
a metric is the mean of a per-user vector and a bootstrap can resample users. NaN marks
a user for whom a metric is undefined (e.g. an unlabelled target category); it is left
out of that metric's mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def hits(ranks: Sequence[int], k: int = 10) -> np.ndarray:
    return (np.asarray(ranks) < k).astype(np.float64)


def ndcgs(ranks: Sequence[int], k: int = 10) -> np.ndarray:
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def reciprocal_ranks(ranks: Sequence[int]) -> np.ndarray:
    return 1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0)


def topk_correct(probs: np.ndarray, truth: Sequence[int], k: int) -> np.ndarray:
    """``[B]`` 1.0 when the true class is among the ``k`` most probable (ties: lower index
    first), 0.0 when not, NaN when the truth is unknown (< 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(truth)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    correct = (order == truth[:, None]).any(1).astype(np.float64)
    return np.where(truth >= 0, correct, np.nan)


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """ROC-AUC as the Mann–Whitney U statistic with mid-ranks for ties (Hanley & McNeil 1982):
    P(score of a random positive > score of a random negative) + ½ P(tie). NaN when a class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # mid-ranks: every member of a tie group gets the mean of the 1-based ranks it spans
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = 0.5 * (a + 1 + b)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class Estimate:
    """A metric's value on all users, its 95 % bootstrap interval, and how many users it covers."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, object]:
        def f(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)
        return {"value": f(self.value), "ci95": [f(self.low), f(self.high)], "n": self.n}


#: a metric: either ("mean", values[B]) or ("auc", (scores[B], labels[B], defined[B]))
MetricSpec = tuple[str, object]


def bootstrap_indices(n: int, reps: int, seed: int) -> np.ndarray:
    """``[reps, n]`` user indices drawn with replacement; the same seed gives the same draws,
    so methods evaluated on the same users in the same order are resampled *paired*."""
    return np.random.default_rng(seed).integers(0, n, size=(reps, n)) if n else np.zeros((reps, 0), dtype=np.int64)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    cnt = ok.sum(1)
    tot = np.where(ok, x, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def _percentiles(x: np.ndarray) -> tuple[float, float]:
    x = x[~np.isnan(x)]
    if not len(x):
        return math.nan, math.nan
    lo, hi = np.percentile(x, [2.5, 97.5])
    return float(lo), float(hi)


def paired_bootstrap(metrics: Mapping[str, MetricSpec], n: int, reps: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """Each metric's value and 95 % percentile interval over ``reps`` resamples of the ``n`` users.

    All metrics share one index matrix (:func:`bootstrap_indices`), so the intervals of
    different metrics and, with the same seed, of different methods are paired.
    """
    idx = bootstrap_indices(n, reps, seed)
    out: dict[str, Estimate] = {}
    for name, (kind, data) in metrics.items():
        if kind == "mean":
            v = np.asarray(data, dtype=np.float64)
            valid = v[~np.isnan(v)]
            value = float(valid.mean()) if len(valid) else math.nan
            lo, hi = _percentiles(_nanmean_rows(v[idx])) if reps and n else (math.nan, math.nan)
            out[name] = Estimate(value, lo, hi, int(len(valid)))
        elif kind == "auc":
            scores, labels, defined = (np.asarray(a) for a in data)  # type: ignore[misc]
            scores = scores.astype(np.float64)
            labels = labels.astype(bool)
            defined = defined.astype(bool) & ~np.isnan(scores)
            value = roc_auc(scores[defined], labels[defined])
            draws = np.full(reps, np.nan)
            for r in range(reps if n else 0):
                sel = idx[r][defined[idx[r]]]
                draws[r] = roc_auc(scores[sel], labels[sel])
            lo, hi = _percentiles(draws)
            out[name] = Estimate(value, lo, hi, int(defined.sum()))
        else:
            raise ValueError(f"metric {name!r}: unknown kind {kind!r}")
    return out


def bootstrap_mean_ci(values: Sequence[float], reps: int = 1000, seed: int = 0) -> Estimate:
    """Convenience: :func:`paired_bootstrap` of one per-user vector's mean."""
    return paired_bootstrap({"m": ("mean", values)}, len(values), reps, seed)["m"]


def paired_difference(a: Sequence[float], b: Sequence[float], reps: int = 1000, seed: int = 0) -> Estimate:
    """Mean of ``a - b`` over users (same users, same order) with its paired 95 % interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return bootstrap_mean_ci(d, reps, seed)


