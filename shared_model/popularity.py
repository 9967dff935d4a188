"""The differentially private popularity prior: a silo's item histogram, its Gaussian
release, and the per-platform log prior the server builds from the silos' releases.

* :func:`user_items`: a user's contribution, at most ``c`` (``popularity-max-items``)
  distinct items, the most recent first, each with weight 1. Adding or removing one user
  changes the histogram by at most √c in L2 norm (c coordinates by at most 1).
* :func:`item_counts`: the histogram of a silo's training users over its platform's
  catalogue items (public, in catalogue order).
* :func:`noisy_counts`: the Gaussian mechanism (Dwork & Roth 2014, Thm A.1; in RDP,
  Mironov 2017 Prop. 7): every coordinate, zero or not, plus N(0, (z·√c)²) from the silo's
  secret randomness. To an accountant it is one Gaussian mechanism of noise multiplier z
  without sampling, ``(z, 1.0, 1)``, composed with the silo's DP-SGD steps.
* :func:`log_prior`: post-processing of the summed releases of a platform (no privacy
  cost): counts below ``threshold`` noise standard deviations are taken as 0 (with ~20k
  items, pure noise reaches ≈ 4 std somewhere), then ``log((n_i + 1) / Σ(n + 1))``.
* :func:`prior_vector`: one log prior per catalogue item, each item's own platform's
  (the item-index row order is the catalogue order), 0 where a platform had no release.

The prior is used by the model as an additive score term ``w · log prior(item)`` with a
trained weight w (:class:`shared_model.model.ScoreTerm`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from shared_model.schema import Catalogue, Event, Silo

#: The record of a server message that carries the prior (``log-prior`` over the catalogue's items).
PRIOR_RECORD = "popularity"


def user_items(history: Sequence[Event], max_items: int) -> list[str]:
    """The user's most recent ``max_items`` distinct items, newest first."""
    out: list[str] = []
    for ev in reversed(history):
        if ev.item_id not in out:
            out.append(ev.item_id)
            if len(out) == max_items:
                break
    return out


def item_counts(silo: Silo, users: Iterable[str], item_ids: Sequence[str], max_items: int) -> np.ndarray:
    """``[len(item_ids)]`` float64: how many of ``users`` have each item among their
    :func:`user_items` (items not in ``item_ids`` — another platform's — are not counted)."""
    column = {item: i for i, item in enumerate(item_ids)}
    counts = np.zeros(len(item_ids), dtype=np.float64)
    for user in users:
        for item in user_items(silo.histories.get(user, []), max_items):
            col = column.get(item)
            if col is not None:
                counts[col] += 1.0
    return counts


def sensitivity(max_items: int) -> float:
    """L2 sensitivity of the histogram to adding or removing one user: √c."""
    return math.sqrt(max_items)


def noisy_counts(counts: np.ndarray, noise_multiplier: float, max_items: int, seed: int) -> np.ndarray:
    """``counts`` plus N(0, (z·√c)²) on every coordinate, from a generator seeded by ``seed``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    std = noise_multiplier * sensitivity(max_items)
    return np.asarray(counts, dtype=np.float64) + rng.normal(0.0, std, size=len(counts))


def log_prior(summed: np.ndarray, noise_std: float, threshold: float) -> np.ndarray:
    """Log prior of one platform's items from the sum of its silos' releases (``noise_std``:
    the standard deviation of the sum's noise, √Σ std²; 0 for exact counts)."""
    n = np.asarray(summed, dtype=np.float64)
    n = np.where(n > threshold * noise_std, np.maximum(n, 0.0), 0.0)
    smoothed = n + 1.0
    return np.log(smoothed / smoothed.sum()) if len(n) else n


def prior_vector(catalogue: Catalogue, priors: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[items]`` float32 in catalogue (item-index row) order: each item's platform's log
    prior (``priors[platform]``, over :meth:`Catalogue.platform_item_ids`), 0 where its
    platform has none."""
    out = np.zeros(len(catalogue.items), dtype=np.float32)
    row = {item: i for i, item in enumerate(catalogue.items)}
    for platform, values in priors.items():
        ids = catalogue.platform_item_ids(platform)
        if len(ids) != len(values):
            raise ValueError(f"platform {platform}: {len(values)} prior values for {len(ids)} catalogue items")
        out[[row[i] for i in ids]] = np.asarray(values, dtype=np.float32)
    return out
