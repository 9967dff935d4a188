"""Empirical ε lower bound from one training run.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023:
m canaries are each included independently with probability ½; the auditor guesses
"in"/"out" on r of them and is right on v. Under ε-DP the number of correct guesses is
stochastically dominated by Binomial(r, e^ε/(1+e^ε)) (their Theorem 3.1 with δ = 0), so
every ε with P[Binomial(r, e^ε/(1+e^ε)) ≥ v] < α is rejected at confidence 1-α; the lower
bound is the largest such ε. We implement the pure-ε (δ = 0) bound; the paper's δ
correction would lower it by a term that is negligible for δ = 1e-5 and small m.
"""

from __future__ import annotations

import math


def binomial_tail(r: int, v: int, p: float) -> float:
    """P[Binomial(r, p) ≥ v], exactly (log-space sum)."""
    if v <= 0:
        return 1.0
    if v > r:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(r + 1) - math.lgamma(k + 1) - math.lgamma(r - k + 1) + k * lp + (r - k) * lq for k in range(v, r + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def epsilon_lower_bound(r: int, v: int, confidence: float = 0.95) -> float:
    """Largest ε with P[Binomial(r, e^ε/(1+e^ε)) ≥ v] ≤ 1 - confidence (0 if none)."""
    if not 0 <= v <= r:
        raise ValueError(f"need 0 ≤ correct ≤ guesses, got {v} of {r}")
    alpha = 1.0 - confidence

    def tail(eps: float) -> float:
        return binomial_tail(r, v, 1.0 / (1.0 + math.exp(-eps)))

    if r == 0 or tail(0.0) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) <= alpha:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return float("inf")
    for _ in range(100):  # tail is increasing in ε: bisect the boundary
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) <= alpha else (lo, mid)
    return lo
