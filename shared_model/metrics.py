"""Per-user ranking and classification metrics on held-out users; an aggregate is the mean
of a per-user vector.

Ranks are 0-based positions of the true next item among the candidates (0 = top; see
:func:`shared_model.scoring.rank_of_target`). With one relevant item the usual
leave-one-out protocol (He et al., "Neural Collaborative Filtering", WWW 2017) gives per
user HR@k = [rank < k], NDCG@k = 1/log2(rank+2) if rank < k else 0, RR = 1/(rank+1).

Ties: ``ranks`` counts the candidates scored strictly above the target and ``tied`` the
others with its score. Each metric is its expected value when the tie is ordered
uniformly at random (the target's rank uniform on ``rank … rank + tied``), e.g.
HR@k = clip(k − rank, 0, tied + 1) / (tied + 1) — so all-equal scores over N items give
HR@k = k/N, chance level (the same convention as the mid-rank AUC below, McSherry &
Najork, "Computing information retrieval performance measures efficiently in the presence
of tied scores", ECIR 2008).
NaN marks a user for whom a metric is undefined (e.g. an unlabelled target category); it
is left out of that metric's mean. The evaluation harness resamples these vectors
(:mod:`simulations.evaluation.bootstrap`); per-silo evaluation reports their :func:`mean`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata


def _tie_mean(ranks: Sequence[int], tied: Sequence[int] | None, gain: Callable[[np.ndarray], np.ndarray],
              k: int | None = None) -> np.ndarray:
    """Per user: the mean of ``gain(r)`` over r = rank … rank + tied (0 beyond ``k``), via
    cumulative sums of the gain over 0 … max(rank + tied)."""
    r = np.asarray(ranks, dtype=np.int64)
    t = np.zeros_like(r) if tied is None else np.asarray(tied, dtype=np.int64)
    if r.size == 0:
        return np.zeros(0)
    top = int((r + t).max()) + 1
    g = gain(np.arange(top, dtype=np.float64))
    if k is not None:
        g[k:] = 0.0
    cum = np.concatenate(([0.0], np.cumsum(g)))
    return np.where(t == 0, g[r], (cum[r + t + 1] - cum[r]) / (t + 1))  # untied: exactly gain(rank)


def hits(ranks: Sequence[int], k: int = 10, tied: Sequence[int] | None = None) -> np.ndarray:
    r = np.asarray(ranks, dtype=np.float64)
    t = np.zeros_like(r) if tied is None else np.asarray(tied, dtype=np.float64)
    return np.clip(k - r, 0.0, t + 1.0) / (t + 1.0)


def ndcgs(ranks: Sequence[int], k: int = 10, tied: Sequence[int] | None = None) -> np.ndarray:
    return _tie_mean(ranks, tied, lambda r: 1.0 / np.log2(r + 2.0), k)


def reciprocal_ranks(ranks: Sequence[int], tied: Sequence[int] | None = None) -> np.ndarray:
    return _tie_mean(ranks, tied, lambda r: 1.0 / (r + 1.0))


def topk_correct(probs: np.ndarray, truth: Sequence[int], k: int) -> np.ndarray:
    """``[B]`` 1.0 when the true class is among the ``k`` highest scores (probabilities or
    logits; ties: lower index first), 0.0 when not, NaN when the truth is unknown (< 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(truth)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    correct = (order == truth[:, None]).any(1).astype(np.float64)
    return np.where(truth >= 0, correct, np.nan)


def mean(values: Sequence[float] | np.ndarray) -> float:
    """Mean over the users where ``values`` is defined (not NaN), summed in user order; NaN
    when there are none."""
    defined = [float(v) for v in np.asarray(values, dtype=np.float64).tolist() if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """ROC-AUC as the Mann–Whitney U statistic with mid-ranks for ties (Hanley & McNeil 1982):
    P(score of a random positive > score of a random negative) + ½ P(tie). NaN when a class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s, method="average")  # mid-ranks: a tie group shares the mean of the ranks it spans
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
