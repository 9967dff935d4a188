"""What numbers may leave a silo, and the Gaussian mechanism that releases its metrics.

Every number a silo's reply carries is in one of three classes (:func:`classify`):

* **public** (:data:`PUBLIC`): mechanism parameters (ε, δ, σ, q, C, steps, budget flags)
  and user counts (``num-examples``: the training users, which FedAvg needs as the weight
  and the sample rate ``q = 1/⌈n/B⌉`` on the ledger already reveals; ``eval-users``: the
  validation users, ``min(valid users, max-eval-users)``). A silo's *number* of users is
  treated as public in this threat model (docs/privacy-policy.md); nothing else about a user is.
* **evaluation metrics**: category accuracy (all users and the migrating ones), HR@10,
  NDCG@10, MRR. Each is a mean of a per-user value in [0, 1] (one held-out example per user).
* **training by-products** (:data:`TRAIN_PRIVATE`): the train loss, the number of empty
  Poisson batches, the wall time. They depend on which users were sampled and on their data.

``release-metrics`` (the silo's policy, a request may only be more private) decides:

``dp``     evaluation metrics are released as noisy sums (:data:`EVAL_COORDINATES`): each
           user's value is clipped to [0, 1], summed over users, and each sum gets
           Gaussian noise N(0, (z·1)²) from the silo's secret randomness; adding or removing
           one user changes each sum by at most 1. Data-dependent denominators (users with
           a known next interest, migrating users) are noisy counts released the same way;
           the others divide by ``eval-users`` (public). Each coordinate is one Gaussian
           mechanism without sampling; the accountant composes them with DP-SGD (Mironov
           2017, RDP of the Gaussian mechanism α/(2z²)). Training by-products are withheld:
           a user sampled in every step contributes to ``local-steps`` batch losses, so a
           noisy train loss would need noise ``local-steps × L`` wide to be private.
``plain``  everything leaves unnoised; the silo writes a ``plain-release`` record naming the
           numbers outside ε, and the server's table and the audit say so.
``none``   only what training needs: public numbers; no metrics, no training by-products.

Noise is drawn by numpy's PCG64 Gaussian sampler, seeded from the silo's secret
(``HMAC(secret, run/silo/round/metrics-PHASE)``). A floating-point Gaussian sampler is not
exactly the continuous mechanism (Mironov 2012); the same caveat applies to Opacus's noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared_model.config import RunConfig

#: Numbers that are public in this threat model (mechanism parameters and user counts).
PUBLIC = frozenset({
    "num-examples", "steps", "epsilon", "epsilon-round", "epsilon-budget", "delta", "noise-multiplier",
    "sample-rate", "max-grad-norm", "budget-exhausted", "refused", "eval-users", "eval-candidates",
    "metrics-withheld",
})
#: Training by-products: depend on the sampled users and their data; never released with noise.
TRAIN_PRIVATE = ("train-loss", "empty-steps", "train-seconds")
#: The noisy sums and counts of a ``dp`` evaluation release, each a per-user value in [0, 1].
EVAL_COORDINATES = ("category-correct-sum", "category-users", "hr10-sum", "ndcg10-sum", "mrr-sum",
                    "migrating-correct-sum", "migrating-users")
#: The evaluation metrics a ``dp`` release reports (derived from the noisy coordinates).
EVAL_METRICS = ("category-accuracy", "category-accuracy-migrating", "hr10", "ndcg10", "mrr", "migrating-users")
SENSITIVITY = 1.0  # each coordinate's per-user bound


def planned_releases(cfg: RunConfig, mode: str) -> int:
    """Gaussian coordinates a run plans: one evaluation release per round and the initial one."""
    return len(EVAL_COORDINATES) * (cfg.num_server_rounds + 1) if mode == "dp" else 0


def classify(metrics: Mapping[str, Any]) -> dict[str, list[str]]:
    """The reply's keys by class: ``public`` and ``private`` (everything else: data-dependent)."""
    public = sorted(k for k in metrics if k in PUBLIC)
    return {"public": public, "private": sorted(k for k in metrics if k not in PUBLIC)}


def keep_public(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Only the public numbers of a reply (what ``none`` sends, and ``dp`` for training)."""
    return {k: v for k, v in metrics.items() if k in PUBLIC}


def evaluation_sums(correct: np.ndarray, hits: np.ndarray, ndcgs: np.ndarray, rrs: np.ndarray,
                    migrating: np.ndarray) -> dict[str, float]:
    """The exact sums of :data:`EVAL_COORDINATES` from per-user vectors (``correct`` is NaN
    where the user's next interest is unknown); every per-user value clipped to [0, 1]."""
    known = ~np.isnan(np.asarray(correct, dtype=np.float64))
    c = np.clip(np.nan_to_num(np.asarray(correct, dtype=np.float64)), 0.0, 1.0)
    mig = np.asarray(migrating, dtype=bool) & known

    def total(v: np.ndarray) -> float:
        return float(np.clip(np.nan_to_num(np.asarray(v, dtype=np.float64)), 0.0, 1.0).sum())

    return {"category-correct-sum": float(c.sum()), "category-users": float(known.sum()),
            "hr10-sum": total(hits), "ndcg10-sum": total(ndcgs), "mrr-sum": total(rrs),
            "migrating-correct-sum": float(c[mig].sum()), "migrating-users": float(mig.sum())}


def gaussian_noise(sums: Mapping[str, float], noise_multiplier: float, seed: int,
                   sensitivity: float = SENSITIVITY) -> dict[str, float]:
    """Each sum plus N(0, (noise_multiplier · sensitivity)²), from a generator seeded by ``seed``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return {k: float(v + rng.normal(0.0, noise_multiplier * sensitivity)) for k, v in sums.items()}


def _ratio(num: float, den: float) -> float:
    return float(min(1.0, max(0.0, num / den))) if den >= 1 else -1.0


def evaluation_metrics(noisy: Mapping[str, float], users: int) -> dict[str, float]:
    """The reported metrics from the noisy coordinates (post-processing: no extra privacy cost).
    A ratio whose (noisy) denominator is below 1 is reported as -1 (undefined), as a mean over
    no users is."""
    return {
        "category-accuracy": _ratio(noisy["category-correct-sum"], noisy["category-users"]),
        "category-accuracy-migrating": _ratio(noisy["migrating-correct-sum"], noisy["migrating-users"]),
        "hr10": _ratio(noisy["hr10-sum"], users),
        "ndcg10": _ratio(noisy["ndcg10-sum"], users),
        "mrr": _ratio(noisy["mrr-sum"], users),
        "migrating-users": float(max(0, round(noisy["migrating-users"]))),
    }


def expected_error(noise_multiplier: float, users: int) -> float:
    """Standard deviation of a noisy mean with a public denominator ``users``: z/users."""
    return noise_multiplier * SENSITIVITY / users if users else float("inf")
