"""Federated DP against local-only DP, silo by silo: does federation help the silo that
needs it (the small region of the unequal setting, :mod:`simulations.datasets.unequal_regions`)?

For each silo, the held-out users of that silo (the same users and order for both methods,
sliced out of the experiment's per-platform groups), each method's metrics with 95 %
paired-bootstrap intervals (:func:`simulations.evaluation.summarise`) and the per-user paired
difference federated − local-only with its interval (:func:`simulations.evaluation.differences`),
both seeded per silo (:func:`simulations.evaluation.group_seed`), so the draws are paired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from simulations.evaluation import differences, group_seed, summarise

PerUser = dict[str, np.ndarray]
#: metrics of the per-silo table (values and paired differences)
SILO_METRICS = ("ndcg10", "hr10", "mrr")


def take(u: Mapping[str, np.ndarray], index: np.ndarray) -> PerUser:
    """The users ``index`` of a per-user result (every array sliced alike)."""
    return {k: np.asarray(v)[index] for k, v in u.items()}


def split_by_silo(per: Mapping[str, PerUser], owners: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, PerUser]]:
    """``silo -> (platform, its users' per-user results)`` from per-platform results and each
    platform group's silo of every case (in case order)."""
    out: dict[str, tuple[str, PerUser]] = {}
    for p, u in per.items():
        silo_of = np.asarray(list(owners.get(p, ())), dtype=object)
        if len(silo_of) != len(u["rank"]):
            raise ValueError(f"platform {p}: {len(silo_of)} owners for {len(u['rank'])} users")
        for s in sorted(set(silo_of.tolist())):
            out[s] = (p, take(u, np.flatnonzero(silo_of == s)))
    return out


def per_silo_comparison(federated: Mapping[str, PerUser], local: Mapping[str, PerUser],
                        owners: Mapping[str, Sequence[str]], reps: int, seed: int,
                        train_users: Mapping[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Per silo: ``{"platform", "users", "train-users", "federated": {metric: estimate},
    "local-only": {...}, "delta": {metric: estimate of federated − local-only}}`` (estimates as
    :meth:`Estimate.as_dict`). ``federated``/``local``: per-platform per-user results of the two
    methods on the same groups; ``owners``: each platform group's silo per case."""
    fed, loc = split_by_silo(federated, owners), split_by_silo(local, owners)
    deltas = differences({"federated": {s: u for s, (_, u) in fed.items()},
                          "local-only": {s: u for s, (_, u) in loc.items()}}, "local-only", reps, seed)
    out: dict[str, dict[str, Any]] = {}
    for s, (p, u) in fed.items():
        if s not in loc:
            continue
        g = group_seed(seed, s)
        out[s] = {
            "platform": p, "users": int(len(u["rank"])),
            "train-users": None if train_users is None else int(train_users.get(s, 0)),
            "federated": {m: e.as_dict() for m, e in summarise(u, reps, g, migration=False).items()
                          if m in SILO_METRICS},
            "local-only": {m: e.as_dict() for m, e in summarise(loc[s][1], reps, g, migration=False).items()
                           if m in SILO_METRICS},
            "delta": {m: deltas.get("federated", {}).get(s, {}).get(m) for m in SILO_METRICS},
        }
    return out


def silo_rows(doc: Mapping[str, Any]) -> list[list[Any]]:
    """CSV rows of ``doc["per-silo"]``: one per silo and metric."""
    ps = doc.get("per-silo") or {}
    rows = []
    for s, r in (ps.get("silos") or {}).items():
        for m in SILO_METRICS:
            f, lo, d = r["federated"].get(m) or {}, r["local-only"].get(m) or {}, r["delta"].get(m) or {}
            rows.append([s, r["platform"], r["users"], r.get("train-users") or "", m,
                         *(_v(e) for e in (f, lo, d) for _v in (_val, _low, _high))])
    return rows


SILO_CSV_HEADER = ["silo", "platform", "users", "train-users", "metric",
                   *(f"{w}-{c}" for w in ("federated", "local-only", "delta") for c in ("value", "ci95-low", "ci95-high"))]


def _val(e: Mapping[str, Any]) -> Any:
    return "" if e.get("value") is None else e["value"]


def _low(e: Mapping[str, Any]) -> Any:
    ci = e.get("ci95") or [None, None]
    return "" if ci[0] is None else ci[0]


def _high(e: Mapping[str, Any]) -> Any:
    ci = e.get("ci95") or [None, None]
    return "" if ci[1] is None else ci[1]
