"""Centralised offline evaluation of a checkpoint and the baselines on held-out users.

A researcher with all silos locally. A silo holds one platform (a platform silo) or several (a
region silo: one region's users on every platform; docs/data-format.md). The held-out examples
of a split are :func:`shared_model.examples.eval_examples`: a platform silo's user has one (the
last event), a region silo's user one per platform with a held-out event (the events at the
user's highest order), each with the whole history before that order, platforms mixed.

Groups:

* each platform P (*within platform*): the held-out examples whose target is on P, from every
  silo that holds P, with the silo's whole history as input (:func:`platform_cases`);
* ``overall``: the platforms' groups pooled;
* ``switch``: the cases of the platform groups whose history is non-empty and whose last
  history event is on another platform than the target (:func:`is_switch`). Only a region
  silo's mixed history has them; the group is left out where it is empty. Its cases are
  also in their platform's group (``overall`` counts them once). Under ``max_users`` it is
  the switching cases of the platform groups' subsets;
* cold start ``A->B``: users with a held-out next item on B; input = only their events on A
  (by each event's item platform, from every silo with the same user id: A's platform silos or
  the region silos) with ``order`` below the target's (the orders of a user's silos are taken
  as one timeline, as in the bundled data); users with no such event are left out
  (:func:`cross_cases`). The same cases on both layouts of a dataset.

Metrics:

* next item: full ranking over the target platform's catalogue; the user's history items on
  that platform are excluded from the candidates (the target never is; other platforms'
  items are no candidates); a tie is ordered at random in expectation and a non-finite score
  is an error (:func:`shared_model.scoring.rank_targets`, for every predictor); HR@10, NDCG@10, MRR.
* next interest: interest-class accuracy@1 and @3, for all users and the migrating
  subset (flag as in :mod:`shared_model.examples`, k = ``migration-k``, read on the history's
  events on the target's platform).
* new interest: on migrating users, whether the most probable category *outside* the user's
  last-k categories (on the target's platform) is the one they moved to
  (``new-interest-acc1-migrating``). The flag says *whether* a user moves (scored by the AUC
  below); this says *where* they go, and is the question a predictor that must commit to one
  arg-max for every user cannot answer with ``category-acc1-migrating`` (it predicts a recent
  category and is wrong by definition).
* migration detection: ROC-AUC of the migration score (:mod:`shared_model.migration`,
  JS divergence) against the flag, over users where the flag is defined; also of the
  predicted probability mass outside the recent categories (``migration-auc-mass``). Not for
  the cold-start groups.

Every metric carries a 95 % paired-bootstrap interval over users
(:func:`simulations.evaluation.bootstrap.paired_bootstrap`; same draws for every method of a group), and
``differences`` gives each method minus a reference method (default ``most-popular``)
per user, with its paired interval.
"""

from __future__ import annotations

import dataclasses

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from shared_model.examples import DEFAULT_K
from shared_model.metrics import hits, ndcgs, reciprocal_ranks, topk_correct
from shared_model.migration import js_divergence, new_interest, recent_distribution
from shared_model.schema import Catalogue, Silo
from shared_model.scoring import rank_targets
from simulations.evaluation.bootstrap import Estimate, paired_bootstrap, paired_difference
from simulations.evaluation.cases import SWITCH, Case, cross_cases, is_switch, platform_cases

METRICS = ("hr10", "ndcg10", "mrr", "category-acc1", "category-acc3", "category-acc1-migrating",
           "category-acc3-migrating", "new-interest-acc1-migrating", "migration-auc", "migration-auc-mass")


class Predictor(Protocol):
    name: str

    def predict(self, cases: Sequence[Case], platform: str) -> tuple[np.ndarray, np.ndarray]: ...


def per_user(predictor: Predictor, cases: Sequence[Case], platform: str, catalogue: Catalogue,
             categories: Sequence[str], k: int = DEFAULT_K, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per-user ranks, category hits and migration scores of one predictor on one platform's cases."""
    cand = catalogue.platform_item_ids(platform)
    col = {i: c for c, i in enumerate(cand)}
    cat_index = {c: i for i, c in enumerate(categories)}
    ranks: list[int] = []
    tied: list[int] = []
    acc1: list[np.ndarray] = []
    acc3: list[np.ndarray] = []
    js: list[float] = []
    mass: list[float] = []
    new1: list[float] = []
    for s in range(0, len(cases), batch_size):
        chunk = cases[s : s + batch_size]
        scores, probs = predictor.predict(chunk, platform)
        scores = torch.as_tensor(np.asarray(scores, dtype=np.float64)).clone()
        targets = torch.tensor([col[c.target.item_id] for c in chunk])
        seen = [{col[e.item_id] for e in c.history if e.item_id in col} for c in chunk]
        ranked = rank_targets(scores, targets, seen, f"{getattr(predictor, 'name', type(predictor).__name__)} "
                                                     f"scores on {platform}")
        ranks.extend(ranked.above.tolist())
        tied.extend(ranked.tied.tolist())
        truth = [cat_index.get(c.target_category, -1) if c.target_category else -1 for c in chunk]
        acc1.append(topk_correct(probs, truth, 1))
        acc3.append(topk_correct(probs, truth, 3))
        for r, c in enumerate(chunk):
            q = (recent_distribution(c.history, catalogue, categories, k, c.target) if c.migration_defined
                 else None)
            if q is None:
                js.append(math.nan)
                mass.append(math.nan)
                new1.append(math.nan)
            else:
                p = np.asarray(probs[r], dtype=np.float64)
                js.append(float(js_divergence(p, q)))
                mass.append(float(1.0 - p[q > 0].sum() / p.sum()))
                new1.append(new_interest_hit(p, q, truth[r]))
    n = len(cases)
    return {
        "rank": np.asarray(ranks, dtype=np.int64),
        "tied": np.asarray(tied, dtype=np.int64),
        "acc1": np.concatenate(acc1) if acc1 else np.zeros(0),
        "acc3": np.concatenate(acc3) if acc3 else np.zeros(0),
        "migrating": np.array([c.migrating for c in cases], dtype=bool),
        "defined": np.array([c.migration_defined for c in cases], dtype=bool),
        "js": np.asarray(js, dtype=np.float64).reshape(n),
        "mass": np.asarray(mass, dtype=np.float64).reshape(n),
        "new1": np.asarray(new1, dtype=np.float64).reshape(n),
    }


def new_interest_hit(probs: np.ndarray, recent: np.ndarray, truth: int) -> float:
    """1.0 when :func:`shared_model.migration.new_interest` (the most probable category outside
    the recent ones) is ``truth``; nan when the target is unlabelled or nothing outside has mass."""
    pick = new_interest(probs, recent)
    if truth < 0 or pick is None:
        return math.nan
    return float(pick == truth)


def concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def summarise(u: dict[str, np.ndarray], reps: int, seed: int, migration: bool = True) -> dict[str, Estimate]:
    """The metrics of :data:`METRICS` with paired-bootstrap 95 % intervals."""
    mig = np.where(u["migrating"], 1.0, np.nan)
    specs: dict[str, Any] = {
        "hr10": ("mean", hits(u["rank"], 10, u["tied"])),
        "ndcg10": ("mean", ndcgs(u["rank"], 10, u["tied"])),
        "mrr": ("mean", reciprocal_ranks(u["rank"], u["tied"])),
        "category-acc1": ("mean", u["acc1"]),
        "category-acc3": ("mean", u["acc3"]),
    }
    if migration:
        specs |= {
            "category-acc1-migrating": ("mean", u["acc1"] * mig),
            "category-acc3-migrating": ("mean", u["acc3"] * mig),
            "new-interest-acc1-migrating": ("mean", u["new1"] * mig),
            "migration-auc": ("auc", (u["js"], u["migrating"], u["defined"])),
            "migration-auc-mass": ("auc", (u["mass"], u["migrating"], u["defined"])),
        }
    return {m: _explained(m, e) for m, e in paired_bootstrap(specs, len(u["rank"]), reps, seed).items()}


def _explained(metric: str, e: Estimate) -> Estimate:
    """``e`` with :data:`UNDEFINED_WHY`'s reason in front of its own when it is undefined."""
    return dataclasses.replace(e, why=f"{UNDEFINED_WHY[metric]}: {e.why}") if e.why and metric in UNDEFINED_WHY else e


#: why a metric can be undefined on a dataset (printed with its "n/a")
UNDEFINED_WHY = {
    "category-acc1": "no target item has an interest category",
    "category-acc3": "no target item has an interest category",
    "category-acc1-migrating": "no migrating user with a labelled target",
    "category-acc3-migrating": "no migrating user with a labelled target",
    "new-interest-acc1-migrating": "no migrating user with a labelled target and a category outside the recent ones",
    "migration-auc": "migration is undefined without both migrating and non-migrating users",
    "migration-auc-mass": "migration is undefined without both migrating and non-migrating users",
}


def group_seed(seed: int, group: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(group.encode())) % (2**32)


DIFFERENCE_METRICS = {"hr10": lambda u: hits(u["rank"], 10, u["tied"]),
                      "ndcg10": lambda u: ndcgs(u["rank"], 10, u["tied"]),
                      "mrr": lambda u: reciprocal_ranks(u["rank"], u["tied"]), "category-acc1": lambda u: u["acc1"],
                      "category-acc3": lambda u: u["acc3"],
                      "new-interest-acc1-migrating": lambda u: u["new1"] * np.where(u["migrating"], 1.0, np.nan)}


def differences(per: Mapping[str, Mapping[str, dict[str, np.ndarray]]], reference: str, reps: int,
                seed: int) -> dict[str, Any]:
    """``method − reference`` per group and metric, mean over users with a paired 95 % interval."""
    out: dict[str, Any] = {}
    ref = per.get(reference, {})
    for method, groups in per.items():
        if method == reference:
            continue
        for g, u in groups.items():
            if g not in ref:
                continue
            out.setdefault(method, {})[g] = {
                m: _explained(m, paired_difference(f(u), f(ref[g]), reps, group_seed(seed, g))).as_dict()
                for m, f in DIFFERENCE_METRICS.items()}
    return out


def evaluate(predictors: Sequence[Predictor], catalogue: Catalogue, silos: Mapping[str, Silo], split: str,
             k: int = DEFAULT_K, reps: int = 1000, seed: int = 0, max_users: int = 0,
             cross: bool = True, batch_size: int = 64, progress: Any = None,
             reference: str | None = "most-popular") -> dict[str, Any]:
    """Every predictor on every group (each platform, ``overall``, ``switch`` where a history
    mixes platforms, each cold-start ``A->B`` unless ``cross`` is false) → JSON-ready dict.

    ``max_users`` caps each platform and cold-start group (a seeded subset); ``switch`` is
    taken from the platform groups' (capped) cases and scored with them, once.
    With ``reference`` (a predictor's name), ``differences`` holds each other method's
    paired difference to it (same users, same bootstrap draws)."""
    categories = catalogue.interest_vocab()
    platforms = [p for p in catalogue.platforms if any(p in s.platforms for s in silos.values())]
    groups: dict[str, tuple[str, list[Case]]] = {}
    rng = np.random.default_rng(seed)
    for p in platforms:
        groups[p] = (p, _cap(platform_cases(catalogue, silos, p, split, k), max_users, rng))
    if cross:
        for a in platforms:
            for b in platforms:
                if a != b:
                    groups[f"{a}->{b}"] = (b, _cap(cross_cases(catalogue, silos, a, b, split), max_users, rng))
    # switch: positions, in each platform group, of the cases whose last history event is on another platform
    switch = {p: np.array([i for i, c in enumerate(groups[p][1]) if is_switch(c, catalogue)], dtype=np.int64)
              for p in platforms}
    switch = {p: idx for p, idx in switch.items() if len(idx)}
    result: dict[str, Any] = {"split": split, "migration-k": k, "bootstrap-reps": reps, "seed": seed,
                              "users": {g: len(cs) for g, (_, cs) in groups.items()}, "methods": {}}
    result["users"]["overall"] = sum(len(groups[p][1]) for p in platforms)
    if switch:
        result["users"][SWITCH] = sum(len(idx) for idx in switch.values())
    all_per: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for pred in predictors:
        per: dict[str, dict[str, np.ndarray]] = {}
        all_per[pred.name] = per
        out: dict[str, Any] = {}
        for g, (plat, cases) in groups.items():
            if progress:
                progress(f"{pred.name}: {g} ({len(cases)} users)")
            if not cases:
                continue
            per[g] = per_user(pred, cases, plat, catalogue, categories, k, batch_size)
            out[g] = {m: e.as_dict() for m, e in summarise(per[g], reps, group_seed(seed, g), "->" not in g).items()}
        within = [per[p] for p in platforms if p in per]
        if within:
            per["overall"] = concat(within)
            out["overall"] = {m: e.as_dict() for m, e in summarise(per["overall"], reps, group_seed(seed, "overall")).items()}
        if switch:
            per[SWITCH] = concat([take(per[p], idx) for p, idx in switch.items()])
            out[SWITCH] = {m: e.as_dict() for m, e in summarise(per[SWITCH], reps, group_seed(seed, SWITCH)).items()}
        result["methods"][pred.name] = out
    if reference and reference in all_per:
        result["reference"] = reference
        result["differences"] = differences(all_per, reference, reps, seed)
    return result


def take(u: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The users ``index`` of a per-user result (every array sliced alike)."""
    return {key: np.asarray(v)[index] for key, v in u.items()}


def _cap(cases: list[Case], max_users: int, rng: np.random.Generator) -> list[Case]:
    if max_users and len(cases) > max_users:
        keep = sorted(rng.choice(len(cases), size=max_users, replace=False).tolist())
        return [cases[i] for i in keep]
    return cases


class ModelPredictor:
    """A checkpoint through :class:`shared_model.scoring.Scorer`."""

    def __init__(self, scorer: Any, name: str = "checkpoint"):
        self.scorer = scorer
        self.name = name

    def predict(self, cases: Sequence[Case], platform: str) -> tuple[np.ndarray, np.ndarray]:
        return self.scorer.predict([c.history for c in cases], platform)


class OwnPlatformHistory:
    """``inner`` reading only each history's events on the target's platform, as a one-platform
    silo (the platforms layout) holds that user: a model of a platform federation scored on a
    region layout's cases, paired with a region federation's model on the same users and targets
    (a cold-start case then has no history, as on a platform silo)."""

    def __init__(self, inner: Any, catalogue: Catalogue, name: str | None = None):
        self.inner = inner
        self.catalogue = catalogue
        self.name = name or inner.name

    def predict(self, cases: Sequence[Case], platform: str) -> tuple[np.ndarray, np.ndarray]:
        items = self.catalogue.items
        own = [dataclasses.replace(c, history=tuple(e for e in c.history if items[e.item_id].platform == platform))
               for c in cases]
        return self.inner.predict(own, platform)


def group_order(groups: Sequence[str]) -> list[str]:
    """Display order: the platforms, ``overall``, ``switch`` (where present), the cold-start ``A->B`` groups."""
    groups = list(groups)
    platforms = [g for g in groups if "->" not in g and g not in ("overall", SWITCH)]
    return platforms + ["overall"] + [g for g in groups if g == SWITCH] + [g for g in groups if "->" in g]


def format_table(result: dict[str, Any]) -> str:
    """Human-readable: one block per group, one row per method, ``value [low, high]``."""
    cols = [("hr10", "HR@10"), ("ndcg10", "NDCG@10"), ("mrr", "MRR"), ("category-acc1", "cat@1"),
            ("category-acc3", "cat@3"), ("category-acc1-migrating", "cat@1 mig"),
            ("new-interest-acc1-migrating", "new@1 mig"), ("migration-auc", "mig AUC")]
    order = group_order(result["users"])
    width = max([len(m) for m in result["methods"]] + [18])
    lines = [f"split {result['split']}; 95% paired-bootstrap intervals over users ({result['bootstrap-reps']} resamples)"]
    undefined: dict[str, str] = {}
    for g in order:
        lines.append("")
        lines.append(f"{g}  ({result['users'].get(g, 0)} users)")
        lines.append(" " * (width + 2) + "".join(f"{h:>22}" for _, h in cols))
        for m, groups_ in result["methods"].items():
            row = groups_.get(g)
            if not row:
                continue
            cells = []
            for key, _ in cols:
                e = row.get(key)
                if not e:
                    cells.append(f"{'-':>22}")
                elif e["value"] is None:
                    cells.append(f"{'n/a':>22}")
                    undefined.setdefault(f"{dict(cols)[key]} ({g})", str(e.get("n/a", "undefined")))
                else:
                    lo, hi = e["ci95"]
                    ci = f"[{lo:.3f},{hi:.3f}]" if lo is not None else "[-]"
                    cells.append(f"{e['value']:>7.3f} {ci:>14}")
            lines.append(f"{m:<{width}}  " + "".join(cells))
    if undefined:
        lines.append("")
        lines.extend(f"n/a: {name}: {why}" for name, why in undefined.items())
    diffs = result.get("differences") or {}
    if diffs:
        lines.append("")
        lines.append(f"paired differences to {result['reference']} (method - reference), NDCG@10 and cat@1:")
        for m, groups_ in diffs.items():
            cells = []
            for g in order:
                if g in groups_:
                    d, a = groups_[g]["ndcg10"], groups_[g]["category-acc1"]
                    cells.append(f"{g} {_signed(d)} / {_signed(a)}")
            lines.append(f"  {m:<{width}} " + "; ".join(cells))
    return "\n".join(lines)


def _signed(e: dict[str, Any]) -> str:
    if e["value"] is None:
        return f"n/a ({e.get('n/a', 'undefined')})"
    lo, hi = e["ci95"]
    if lo is None or hi is None:
        return f"{e['value']:+.3f} [-]"
    return f"{e['value']:+.3f} [{lo:+.3f},{hi:+.3f}]"
