"""Ranking and classification metrics on held-out users.

Ranks are 0-based positions of the true next item among the candidates (0 = top).
HR@k and NDCG@k with one relevant item follow the usual leave-one-out protocol
(He et al., "Neural Collaborative Filtering", WWW 2017): NDCG@k = 1/log2(rank+2) if
rank < k else 0; MRR = 1/(rank+1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def rank_of_target(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target column; ties count against the target."""
    target_score = scores.gather(1, target.view(-1, 1))
    return (scores >= target_score).sum(1) - 1


def hit_rate(ranks: Sequence[int], k: int = 10) -> float:
    return sum(1 for r in ranks if r < k) / len(ranks) if len(ranks) else math.nan


def ndcg(ranks: Sequence[int], k: int = 10) -> float:
    return sum(1.0 / math.log2(r + 2) for r in ranks if r < k) / len(ranks) if len(ranks) else math.nan


def mrr(ranks: Sequence[int]) -> float:
    return sum(1.0 / (r + 1) for r in ranks) / len(ranks) if len(ranks) else math.nan


def accuracy(predicted: Sequence[int], truth: Sequence[int]) -> float:
    pairs = [(p, t) for p, t in zip(predicted, truth) if t >= 0]
    return sum(p == t for p, t in pairs) / len(pairs) if pairs else math.nan
