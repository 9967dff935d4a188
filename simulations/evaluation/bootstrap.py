"""The paired bootstrap over users: a metric's value and 95 % interval from a per-user
vector (:mod:`shared_model.metrics`) or from per-user scores and labels (ROC-AUC).

A metric is the mean of a per-user vector, so a bootstrap can resample users; NaN marks a
user for whom a metric is undefined and is left out of that metric's mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shared_model.metrics import roc_auc


@dataclass(frozen=True)
class Estimate:
    """A metric's value on all users, its 95 % bootstrap interval, and how many users it covers."""

    value: float
    low: float
    high: float
    n: int
    why: str = ""  # why the metric is undefined (value NaN), for the "n/a" a reader sees

    def as_dict(self) -> dict[str, object]:
        def f(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)
        out: dict[str, object] = {"value": f(self.value), "ci95": [f(self.low), f(self.high)], "n": self.n}
        if math.isnan(self.value):
            out["n/a"] = self.why or "undefined"
        return out


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
            why = "" if len(valid) else (f"defined for none of the {len(v)} users" if len(v) else "no users")
            out[name] = Estimate(value, lo, hi, int(len(valid)), why)
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
            pos, neg = int(labels[defined].sum()), int((~labels[defined]).sum())
            why = "" if pos and neg else f"needs both classes: {pos} positive, {neg} negative users"
            out[name] = Estimate(value, lo, hi, int(defined.sum()), why)
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


