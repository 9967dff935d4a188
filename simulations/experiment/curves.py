"""Learning curves: validation NDCG@10 against cumulative DP-SGD steps per silo
(round × local steps) for federated DP, federated non-private and local-only, to show where
each stops improving.

Every round's checkpoint (``OUT/runs/<run>/checkpoints/round-NNN``, round 0 = untrained) is
scored centrally through the one scoring path (:class:`shared_model.scoring.Scorer` via the
experiment's predictors) on one seeded subset of at most ``curve-users`` **validation** users
per platform, the same users for every method and round, so the cost is bounded and the
points are comparable. Local-only: each silo's round-r checkpoint scores its own silo's users
(:class:`RoutedPredictor`); pooling those users is the user-weighted average over silos.
Each point carries a 95 % bootstrap interval over users (:func:`simulations.evaluation.summarise`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from simulations.evaluation import ModelPredictor, concat, summarise
from simulations.experiment.evaluate import Group, RoutedPredictor, evaluate_method

#: metrics of a curve point
CURVE_METRICS = ("ndcg10", "hr10", "category-acc1")


def round_checkpoints(run_dir: Path) -> dict[int, Path]:
    """``round -> checkpoint folder`` of a training run (``checkpoints/round-NNN``)."""
    out = {}
    for p in sorted((Path(run_dir) / "checkpoints").glob("round-*")):
        try:
            out[int(p.name.split("-", 1)[1])] = p
        except ValueError:
            continue
    return out


def common_rounds(run_dirs: Sequence[Path]) -> list[int]:
    """Rounds every one of ``run_dirs`` has a checkpoint for, in order."""
    sets = [set(round_checkpoints(d)) for d in run_dirs]
    return sorted(set.intersection(*sets)) if sets else []


def curve_point(per: Mapping[str, Mapping[str, Any]], reps: int, seed: int) -> dict[str, Any]:
    """One point from per-platform per-user results: every platform's users pooled, each of
    :data:`CURVE_METRICS` with its 95 % bootstrap interval."""
    parts = [dict(u) for u in per.values() if len(u["rank"])]
    if not parts:
        return {"users": 0}
    pooled = concat(parts)
    est = summarise(pooled, reps, seed, migration=False)
    return {"users": int(len(pooled["rank"])), **{m: est[m].as_dict() for m in CURVE_METRICS}}


def learning_curve(runs: Mapping[str, Path], groups: Mapping[str, Group], platforms: Sequence[str],
                   score: Callable[[Mapping[str, Path]], Any], evaluate: Callable[..., Mapping[str, Any]],
                   steps_per_round: int, reps: int, seed: int) -> list[dict[str, Any]]:
    """The curve of one method, one point per round every run of it has a checkpoint for.
    ``runs``: silo (``""`` for one global model) -> run folder; ``score(checkpoints)`` makes
    the predictor of one round from ``{silo: checkpoint}``; ``evaluate(pred, groups, platforms)``
    gives per-platform per-user results (the experiment's :func:`evaluate_method`)."""
    points = []
    for r in common_rounds(list(runs.values())):
        t0 = time.time()
        pred = score({s: round_checkpoints(d)[r] for s, d in runs.items()})
        per = evaluate(pred, groups, platforms)
        del pred
        points.append({"round": r, "dp-steps": r * steps_per_round, **curve_point(per, reps, seed),
                       "seconds": round(time.time() - t0, 1)})
    return points


def plan_curves(plan: Any, out: Path, catalogue: Any, silos: Mapping[str, Any], k: int,
                log: Callable[[str], None], clock: Callable[[], str]) -> dict[str, Any]:
    """Every learning curve of ``plan`` (``plan.curve_methods``) on a seeded subset of ≤
    ``preset.curve_users`` validation users per platform: ``{"users": {platform: n},
    "steps-per-round": s, "methods": {name: [point, ...]}}``."""
    from shared_model.scorer import Scorer
    from simulations.experiment.evaluate import build_groups

    preset = plan.preset
    if not plan.curve_methods:
        return {}
    platforms = [p for p in catalogue.platforms if p in plan.platforms]
    groups = build_groups(catalogue, silos, "valid", k, preset.curve_users, preset.seed + 101)
    owner = {id(c): s for g in groups.values() for c, s in zip(g.cases, g.silo)}
    steps = preset.config().local_steps
    by_name = {m.name: m for m in plan.methods}

    def load(ck: Path) -> Any:
        return Scorer.from_checkpoint(ck, plan.dataset, plan.base_model)

    def evaluate(pred: Any, grp: Mapping[str, Group], plats: Sequence[str]) -> Mapping[str, Any]:
        return evaluate_method(pred, grp, plats, catalogue, k)

    curves: dict[str, Any] = {}
    for name in plan.curve_methods:
        t0 = time.time()
        m = by_name[name]
        if m.family == "local-only":
            runs = {s: out / "runs" / key for s, key in m.silo_of_run.items()}

            def score(cks: Mapping[str, Path], name: str = name) -> Any:
                return RoutedPredictor(name, {s: load(ck) for s, ck in cks.items()}, owner)
        else:
            runs = {"": out / "runs" / m.runs[0]}

            def score(cks: Mapping[str, Path], name: str = name) -> Any:
                return ModelPredictor(load(cks[""]), name)
        curves[name] = learning_curve(runs, groups, platforms, score, evaluate, steps, preset.bootstrap, preset.seed)
        log(f"{clock()} learning curve {name}: {len(curves[name])} rounds in {time.time() - t0:.0f} s")
    return {"split": "valid", "users": {p: len(g.cases) for p, g in groups.items()}, "steps-per-round": steps,
            "methods": curves}
