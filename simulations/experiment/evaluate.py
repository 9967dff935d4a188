"""Evaluate every method of a plan on the held-out users, through the evaluation harness.

Per-user metrics, summaries with paired-bootstrap intervals and paired differences all come
from :mod:`simulations.evaluation` (``platform_cases``, ``cross_cases``, ``per_user``,
``summarise``, ``differences``, ``concat``). What the experiment adds is small:

* groups that remember each case's silo (:class:`Group`), so local-only can score every user
  with their own silo's model (:class:`RoutedPredictor`);
* which groups each method is evaluated on: every platform and ``overall``, or only the
  platform a leave-one-platform-out model never saw; cross-platform ``A->B`` groups for every
  method with one model of both platforms;
* region silos (a silo holding several platforms): a platform group takes the cases on that
  platform from every silo holding it, each still owned by its silo (local-only routes both
  platforms' cases of a region silo to that silo's model), and ``switch`` (the cases whose
  last history event is on another platform than the target, :func:`is_switch`) is taken
  from the platform groups' cases and reported like the other groups;
* two references: ``delta-*`` to :data:`REFERENCE` and ``delta-markov-*`` (next-interest
  metrics only) to :data:`INTEREST_REFERENCE`.

Every group of ``split`` users (optionally a seeded subset of ``max-users`` per platform) is
the same for every method, and the bootstrap draws of a group are the same for every method
(paired). Nothing is tuned: validation users only feed the per-round curves
(:func:`round_curves`, from each federated run's ``metrics.json``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulations.evaluation import (
    SWITCH,
    ModelPredictor,
    all_baselines,
    concat,
    cross_cases,
    differences,
    group_seed,
    is_switch,
    per_user,
    platform_cases,
    summarise,
    take,
)
from simulations.experiment.per_silo import per_silo_comparison, pooled_comparison, small_silos
from simulations.experiment.plan import Plan

REFERENCE = "most-popular"
#: The next-interest reference: every method's category metrics also get a paired Δ to it.
INTEREST_REFERENCE = "category-markov"
#: Harness difference metrics reported against each reference (``delta-*``, ``delta-markov-*``).
REFERENCE_DELTAS = ("ndcg10", "category-acc1")
INTEREST_DELTAS = ("category-acc1", "category-acc3", "new-interest-acc1-migrating")

PerUser = dict[str, np.ndarray]


@dataclass
class Group:
    platform: str
    cases: list[Any]
    silo: list[str]  # silo of each case (for local-only routing)


def _subset(items: list[Any], max_users: int, rng: np.random.Generator) -> list[int]:
    """Indices of a seeded subset of at most ``max_users`` (all when 0), in order."""
    if max_users and len(items) > max_users:
        return sorted(rng.choice(len(items), size=max_users, replace=False).tolist())
    return list(range(len(items)))


def build_groups(catalogue: Any, silos: Mapping[str, Any], split: str, k: int, max_users: int,
                 seed: int) -> dict[str, Group]:
    """Per platform: held-out cases on that platform of every silo holding it (silos in name
    order, as :func:`platform_cases`; a region silo's user has one per platform), optionally a
    seeded subset."""
    rng = np.random.default_rng(seed)
    groups: dict[str, Group] = {}
    for p in catalogue.platforms:
        cases, owner = [], []
        for name in sorted(silos):
            if p in silos[name].platforms:
                got = platform_cases(catalogue, {name: silos[name]}, p, split, k)
                cases += got
                owner += [name] * len(got)
        if cases:
            keep = _subset(cases, max_users, rng)
            groups[p] = Group(p, [cases[i] for i in keep], [owner[i] for i in keep])
    return groups


def switch_positions(groups: Mapping[str, Group], catalogue: Any) -> dict[str, np.ndarray]:
    """Per platform group, the positions of its ``switch`` cases (:func:`is_switch`: the last
    history event on another platform than the target); only groups that have some, so a
    dataset of platform silos has none."""
    out = {p: np.array([i for i, c in enumerate(g.cases) if is_switch(c, catalogue)], dtype=np.int64)
           for p, g in groups.items()}
    return {p: idx for p, idx in out.items() if len(idx)}


def switch_group(per: Mapping[str, PerUser], switch: Mapping[str, np.ndarray]) -> dict[str, PerUser]:
    """``{"switch": per-user results}`` sliced out of the per-platform results ``per`` (its
    cases are scored once, with their platform group), or ``{}`` when there is none."""
    parts = [take(per[p], idx) for p, idx in switch.items() if p in per]
    return {SWITCH: concat(parts)} if parts else {}


def build_cross_groups(catalogue: Any, silos: Mapping[str, Any], split: str, max_users: int,
                       seed: int) -> dict[str, Group]:
    """``A->B`` for every ordered pair of platforms: held-out users of B whose input is only
    their earlier events on A (:func:`cross_cases`), optionally a seeded subset."""
    rng = np.random.default_rng(seed + 1)
    groups: dict[str, Group] = {}
    for a in catalogue.platforms:
        for b in catalogue.platforms:
            if a == b:
                continue
            cases = cross_cases(catalogue, silos, a, b, split)
            cases = [cases[i] for i in _subset(cases, max_users, rng)]
            if cases:
                groups[f"{a}->{b}"] = Group(f"{a}->{b}", cases, [""] * len(cases))
    return groups


class RoutedPredictor:
    """Local-only: each case is scored by the model of its own silo."""

    def __init__(self, name: str, scorers: Mapping[str, Any], owner: Mapping[int, str]):
        self.name = name
        self.models = {s: ModelPredictor(sc, s) for s, sc in scorers.items()}
        self.owner = owner  # id(case) -> silo

    def predict(self, cases: Sequence[Any], platform: str) -> tuple[np.ndarray, np.ndarray]:
        scores: list[Any] = [None] * len(cases)
        probs: list[Any] = [None] * len(cases)
        by_silo: dict[str, list[int]] = {}
        for i, c in enumerate(cases):
            by_silo.setdefault(self.owner[id(c)], []).append(i)
        for silo, idx in by_silo.items():
            s, p = self.models[silo].predict([cases[i] for i in idx], platform)
            for j, i in enumerate(idx):
                scores[i], probs[i] = np.asarray(s[j]), np.asarray(p[j])
        return np.stack(scores), np.stack(probs)


def evaluate_method(pred: Any, groups: Mapping[str, Group], platforms: Sequence[str], catalogue: Any,
                    k: int) -> dict[str, PerUser]:
    """Per-user results of one predictor on each of ``platforms``' groups."""
    categories = catalogue.interest_vocab()
    return {p: per_user(pred, groups[p].cases, p, catalogue, categories, k) for p in platforms if p in groups}


def evaluate_cross(pred: Any, cross: Mapping[str, Group], catalogue: Any, k: int) -> dict[str, PerUser]:
    """Per-user results of one predictor on each cross-platform group (ranked on the target platform)."""
    categories = catalogue.interest_vocab()
    return {g: per_user(pred, grp.cases, g.split("->")[1], catalogue, categories, k) for g, grp in cross.items()}


def with_overall(per: Mapping[str, PerUser], platforms: Sequence[str]) -> dict[str, PerUser]:
    """``per`` plus ``overall``: every platform's users pooled."""
    return {**per, "overall": concat([per[p] for p in platforms if p in per])}


def _deltas(groups: Mapping[str, PerUser], ref: Mapping[str, PerUser], reps: int,
            seed: int) -> dict[str, dict[str, Any]]:
    """:func:`differences` of ``groups`` to ``ref`` (per group: metric -> estimate)."""
    return differences({"method": dict(groups), "reference": dict(ref)}, "reference", reps, seed).get("method", {})


def summarise_all(per: Mapping[str, PerUser], ref: Mapping[str, PerUser] | None, overall: bool, reps: int,
                  seed: int, cross: Mapping[str, PerUser] | None = None,
                  interest_ref: Mapping[str, PerUser] | None = None,
                  switch: Mapping[str, PerUser] | None = None) -> dict[str, dict[str, Any]]:
    """Each group's metrics (and overall when asked; then ``switch``, when given: not part of
    overall, its cases are already there) with paired intervals, Δ to the reference
    (``delta-*``) and, for the next-interest metrics, Δ to :data:`INTEREST_REFERENCE` (``delta-markov-*``)."""
    groups = dict(per)
    if overall and per:
        groups["overall"] = concat(list(per.values())) if len(per) > 1 else next(iter(per.values()))
    groups.update(switch or {})
    groups.update(cross or {})
    to_ref = _deltas(groups, ref, reps, seed) if ref is not None else {}
    within = {g: u for g, u in groups.items() if "->" not in g}
    to_markov = _deltas(within, interest_ref, reps, seed) if interest_ref is not None else {}
    out: dict[str, dict[str, Any]] = {}
    for g, u in groups.items():
        est = {m: e.as_dict() for m, e in summarise(u, reps, group_seed(seed, g), migration="->" not in g).items()}
        for m in REFERENCE_DELTAS if g in to_ref else ():
            est[f"delta-{m}"] = to_ref[g][m]
        for m in INTEREST_DELTAS if g in to_markov else ():
            est[f"delta-markov-{m}"] = to_markov[g][m]
        out[g] = {"users": int(len(u["rank"])), "metrics": est}
    return out


def last_checkpoint(run_dir: Path) -> Path:
    """The newest ``checkpoints/round-NNN`` of a training run (``FileNotFoundError`` when none)."""
    found = sorted((run_dir / "checkpoints").glob("round-*"))
    if not found:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no checkpoint")
    return found[-1]


def spent_epsilon(run_dir: Path) -> float | None:
    """Largest cumulative ε any silo reached in a federated run (from metrics.json)."""
    p = run_dir / "metrics.json"
    if not p.is_file():
        return None
    doc = json.loads(p.read_text())
    eps = [r.get("epsilon") for r in doc.get("records", []) if r.get("phase") == "train"]
    eps = [float(e) for e in eps if isinstance(e, (int, float)) and math.isfinite(float(e))]
    return max(eps) if eps else None


def round_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Validation metrics of the ``ALL`` row (every silo pooled) per round of a federated run."""
    p = run_dir / "metrics.json"
    if not p.is_file():
        return {}
    doc = json.loads(p.read_text())
    out: dict[str, list[tuple[int, float]]] = {}
    for r in doc.get("records", []):
        if r.get("phase") == "evaluate" and r.get("silo") == "ALL":
            for m in ("ndcg10", "category-accuracy", "category-accuracy-migrating"):
                v = r.get(m)
                if isinstance(v, (int, float)) and v >= 0:
                    out.setdefault(m, []).append((int(r["round"]), float(v)))
    return {m: sorted(v) for m, v in out.items()}


def evaluate_plan(plan: Plan, out: Path, log: Callable[[str], None], clock: Callable[[], str]) -> dict[str, Any]:
    """Every method of ``plan`` (its runs trained under OUT/runs) on the held-out users of the
    preset's split: ``{"users": {group: n}, "methods": {name: entry}, "per-silo": table 4}`` for
    results.json, plus the loaded ``catalogue``, ``silos`` and migration ``k`` for the curves."""
    from shared_model.dataset import load_dataset, load_dataset_info
    from shared_model.examples import DEFAULT_K
    from shared_model.scorer import Scorer

    preset, dataset = plan.preset, plan.dataset
    catalogue, silos = load_dataset(dataset, plan.base_model, preset.config().max_item_tokens)
    k = int(load_dataset_info(dataset).get("migration_k", DEFAULT_K))
    platforms = [p for p in catalogue.platforms if p in plan.platforms]
    groups = build_groups(catalogue, silos, preset.split, k, preset.max_users, preset.seed)
    owner = {id(c): s for g in groups.values() for c, s in zip(g.cases, g.silo)}
    switch = switch_positions(groups, catalogue)
    baselines = {b.name: b for b in all_baselines(catalogue, silos)}
    reps, seed = preset.bootstrap, preset.seed
    ref_per = evaluate_method(baselines[REFERENCE], groups, platforms, catalogue, k)
    ref_all = with_overall(ref_per, platforms) | switch_group(ref_per, switch)
    cross = build_cross_groups(catalogue, silos, preset.split, preset.max_users, preset.seed)
    cross = {g: grp for g, grp in cross.items() if all(p in platforms for p in g.split("->"))}
    ref_all.update(evaluate_cross(baselines[REFERENCE], cross, catalogue, k))
    markov_per = evaluate_method(baselines[INTEREST_REFERENCE], groups, platforms, catalogue, k)
    markov_all = with_overall(markov_per, platforms) | switch_group(markov_per, switch)
    delta = preset.config().delta
    results: dict[str, Any] = {}
    fed_name, local_name = per_silo_pair(plan)
    kept: dict[str, dict[str, PerUser]] = {}
    for n, m in enumerate(plan.methods, 1):
        t0 = time.time()
        evals = list(m.eval_platforms) if m.eval_platforms else platforms
        if m.family == "baseline":
            pred: Any = baselines[m.name]
        elif m.family == "local-only":
            scorers = {s: Scorer.from_checkpoint(last_checkpoint(out / "runs" / key), dataset, plan.base_model)
                       for s, key in m.silo_of_run.items()}
            pred = RoutedPredictor(m.name, scorers, owner)
        else:
            pred = ModelPredictor(Scorer.from_checkpoint(last_checkpoint(out / "runs" / m.runs[0]), dataset,
                                                         plan.base_model), m.name)
        per = (ref_per if m.name == REFERENCE else markov_per if m.name == INTEREST_REFERENCE
               else evaluate_method(pred, groups, evals, catalogue, k))
        per = {p: u for p, u in per.items() if p in evals}
        if m.name in (fed_name, local_name):
            kept[m.name] = per
        # cross-platform groups: every method trained on both platforms' silos with one model
        # (not local-only: a silo model never saw the other platform; not LOPO: it is its own transfer row)
        per_cross = None
        if m.family not in {"local-only", "lopo"}:
            per_cross = ({g: ref_all[g] for g in cross} if m.name == REFERENCE
                         else evaluate_cross(pred, cross, catalogue, k))
        # switch: for the methods evaluated on every platform (the same cases, sliced out of theirs)
        per_switch = switch_group(per, switch) if m.eval_platforms is None else None
        summary = summarise_all(per, None if m.name == REFERENCE else ref_all, m.eval_platforms is None, reps, seed,
                                per_cross, None if m.name == INTEREST_REFERENCE else markov_all, per_switch)
        spent = None
        if m.family in {"federated-dp", "lopo"}:
            spent = spent_epsilon(out / "runs" / m.runs[0])
        elif m.family == "local-only":
            vals = [v for v in (spent_epsilon(out / "runs" / key) for key in m.runs) if v is not None]
            spent = max(vals) if vals else None
        results[m.name] = {"family": m.family, "epsilon": m.epsilon, "epsilon-spent": spent,
                           "delta": delta if m.epsilon is not None else None,
                           "train-platforms": list(m.train_platforms), "runs": list(m.runs), "groups": summary}
        del pred
        log(f"{clock()} evaluated {n}/{len(plan.methods)} {m.name} in {time.time() - t0:.0f} s")
    per_silo: dict[str, Any] = {}
    if fed_name in kept and local_name in kept:
        train_users = {s: sum(1 for v in silo.splits.values() if v == "train") for s, silo in silos.items()}
        owners = {p: g.silo for p, g in groups.items()}
        per_silo = {"federated": fed_name, "local-only": local_name, "split": preset.split,
                    "silos": per_silo_comparison(kept[fed_name], kept[local_name], owners, reps, seed, train_users)}
        small = pooled_comparison(kept[fed_name], kept[local_name], owners, small_silos(train_users), reps, seed,
                                  train_users)
        if small is not None:
            per_silo["pooled"] = {"small": small}
    users = {g: len(v.cases) for g, v in groups.items()}
    if switch:
        users[SWITCH] = int(sum(len(idx) for idx in switch.values()))
    return {"users": users | {g: len(v.cases) for g, v in cross.items()}, "methods": results,
            "per-silo": per_silo, "catalogue": catalogue, "silos": silos, "k": k}


def per_silo_pair(plan: Plan) -> tuple[str | None, str | None]:
    """(federated DP method at the local-only runs' ε, local-only method) of the per-silo table."""
    local = next((m for m in plan.methods if m.family == "local-only"), None)
    fed = next((m for m in plan.methods if m.family == "federated-dp" and local is not None
                and m.epsilon == local.epsilon), None)
    return (fed.name if fed else None), (local.name if local else None)
