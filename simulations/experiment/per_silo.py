"""Federated DP against local-only DP, silo by silo: does federation help the silo that
needs it (the small region of the unequal setting, :mod:`simulations.datasets.unequal_regions`)?

For each silo, the held-out users of that silo (the same users and order for both methods,
sliced out of the experiment's per-platform groups), each method's metrics with 95 %
paired-bootstrap intervals (:func:`simulations.evaluation.summarise`) and the per-user paired
difference federated − local-only with its interval (:func:`simulations.evaluation.differences`),
both seeded per silo (:func:`simulations.evaluation.group_seed`), so the draws are paired.
The small silos, with fewer than half the median silo's training users, are also compared
pooled (one row, their users together): a small silo alone has too few held-out users for a
narrow interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from simulations.evaluation import concat, differences, group_seed, summarise

PerUser = dict[str, np.ndarray]
#: metrics of the per-silo table (values and paired differences)
SILO_METRICS = ("ndcg10", "hr10", "mrr")


def take(u: Mapping[str, np.ndarray], index: np.ndarray) -> PerUser:
    """The users ``index`` of a per-user result (every array sliced alike)."""
    return {k: np.asarray(v)[index] for k, v in u.items()}


def split_by_silo(per: Mapping[str, PerUser], owners: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, PerUser]]:
    """``silo -> (platform, its cases' per-user results)`` from per-platform results and each
    platform group's silo of every case (in case order). A region silo's cases on several
    platforms are concatenated (platform order), its platform their names joined with ``+``."""
    parts: dict[str, list[tuple[str, PerUser]]] = {}
    for p, u in per.items():
        silo_of = np.asarray(list(owners.get(p, ())), dtype=object)
        if len(silo_of) != len(u["rank"]):
            raise ValueError(f"platform {p}: {len(silo_of)} owners for {len(u['rank'])} users")
        for s in sorted(set(silo_of.tolist())):
            parts.setdefault(s, []).append((p, take(u, np.flatnonzero(silo_of == s))))
    return {s: (got[0][0], got[0][1]) if len(got) == 1 else ("+".join(p for p, _ in got), concat([u for _, u in got]))
            for s, got in parts.items()}


def _entry(platform: str, fed: PerUser, loc: PerUser, delta: Mapping[str, Any], reps: int, seed: int,
           train_users: int | None) -> dict[str, Any]:
    """One row: both methods' metrics on the same users and draws (``seed``), and their Δ."""
    def metrics(u: PerUser) -> dict[str, Any]:
        return {m: e.as_dict() for m, e in summarise(u, reps, seed, migration=False).items() if m in SILO_METRICS}

    return {"platform": platform, "users": int(len(fed["rank"])), "train-users": train_users,
            "federated": metrics(fed), "local-only": metrics(loc), "delta": {m: delta.get(m) for m in SILO_METRICS}}


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
    return {s: _entry(p, u, loc[s][1], deltas.get("federated", {}).get(s, {}), reps, group_seed(seed, s),
                      None if train_users is None else int(train_users.get(s, 0)))
            for s, (p, u) in fed.items() if s in loc}


def small_silos(train_users: Mapping[str, int]) -> list[str]:
    """The silos with fewer than half the median silo's training users (none when the silos are
    about equal: below the median alone would call the smaller of two equal regions small)."""
    if not train_users:
        return []
    median = float(np.median(list(train_users.values())))
    return sorted(s for s, n in train_users.items() if n < median / 2)


def pooled_comparison(federated: Mapping[str, PerUser], local: Mapping[str, PerUser],
                      owners: Mapping[str, Sequence[str]], silos: Sequence[str], reps: int, seed: int,
                      train_users: Mapping[str, int] | None = None) -> dict[str, Any] | None:
    """:func:`per_silo_comparison`'s entry for ``silos`` pooled: their held-out users together
    (platform ``"a+b"``), the two methods on the same users and draws; None when none has users."""
    fed, loc = split_by_silo(federated, owners), split_by_silo(local, owners)
    kept = [s for s in sorted(silos) if s in fed and s in loc]
    if not kept:
        return None
    f, lo = concat([fed[s][1] for s in kept]), concat([loc[s][1] for s in kept])
    key = "+".join(kept)
    d = differences({"federated": {key: f}, "local-only": {key: lo}}, "local-only", reps, seed)
    platform = "+".join(sorted({fed[s][0] for s in kept}))
    train = None if train_users is None else int(sum(train_users.get(s, 0) for s in kept))
    return {"silos": kept, **_entry(platform, f, lo, d.get("federated", {}).get(key, {}), reps,
                                    group_seed(seed, key), train)}


def silo_rows(doc: Mapping[str, Any]) -> list[list[Any]]:
    """CSV rows of ``doc["per-silo"]``: one per silo and metric, then one per pooled group
    (silo ``pooled:<group>``, e.g. ``pooled:small``) and metric."""
    ps = doc.get("per-silo") or {}
    rows = []
    pooled = {f"pooled:{k}": r for k, r in (ps.get("pooled") or {}).items()}
    for s, r in {**(ps.get("silos") or {}), **pooled}.items():
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
