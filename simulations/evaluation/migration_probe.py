"""Probe: can a migration-aware head or user-level signal predict *whether* and *where* a user
moves? Centrally, without noise, on the **valid** users (the test split is never read).

Two questions, each answered by what the best-case (non-private, converged) model reaches:

1. *Whether* — ROC-AUC of user-level migration-propensity signals computed from the user's
   own history against the migration flag (:mod:`shared_model.examples`): the user's own past
   migration rate (the share of their earlier events that left the categories of the k
   events before them, add-½ smoothed), the share of distinct categories in the history, the
   length of the current same-category streak, and the history length — all read on the
   history's events on the target's platform (a region silo's history mixes platforms, whose
   classes differ; :func:`shared_model.examples.same_platform`). An AUC near 0.5 means the
   signal carries no information about the next move.
2. *Where* — the ``history-logit`` baseline (the next-interest head's conditional logit, fitted
   to convergence) with a migration-aware loss term of weight λ: on migrating transitions only,
   the cross entropy of the target among the categories outside the last k
   (:class:`simulations.evaluation.baselines.HistoryLogit`, ``migration_weight``). Reported
   next to category-Markov and the majority class on cat@1, new-interest acc@1 on migrating
   users and migration AUC, with 95 % paired-bootstrap intervals.

Run: ``python -m simulations.evaluation.migration_probe [--dataset DIR] [--weights 0.3 1 3]``.
The figures measured on the bundled data are in docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from shared_model.dataset import load_dataset
from shared_model.examples import DEFAULT_K, eval_examples, migration_defined, same_platform
from shared_model.metrics import roc_auc
from shared_model.schema import Catalogue, Event
from simulations.evaluation.baselines import CategoryMarkov, HistoryLogit, MostPopular, TrainStats
from simulations.evaluation.cases import SWITCH
from simulations.evaluation.harness import evaluate

BUNDLED = Path(__file__).resolve().parents[2] / "data" / "amazon-art-office"
SHOWN = (("category-acc1", "cat@1"), ("category-acc3", "cat@3"), ("new-interest-acc1-migrating", "new@1 mig"),
         ("migration-auc", "mig AUC"))


def propensity_signals(history: Sequence[Event], catalogue: Catalogue, k: int = DEFAULT_K,
                       target: Event | None = None) -> dict[str, float]:
    """User-level signals of how likely the user is to move next, from their own history (its
    events on ``target``'s platform when given)."""
    if target is not None:
        history = same_platform(history, target, catalogue)
    labels = [catalogue.items[e.item_id].interest for e in history]
    moves = seen = 0
    for t in range(1, len(labels)):
        recent = {c for c in labels[max(0, t - k):t] if c is not None}
        if labels[t] is None or not recent:
            continue
        seen += 1
        moves += labels[t] not in recent
    labelled = [c for c in labels if c is not None]
    streak = 0
    for c in reversed(labelled):
        if c != labelled[-1]:
            break
        streak += 1
    return {"past-migration-rate": (moves + 0.5) / (seen + 1),
            "distinct-share": len(set(labelled)) / max(1, len(labelled)),
            "short-streak": -float(streak),
            "history-length": float(len(history))}


def propensity_auc(catalogue: Catalogue, silos: dict, platform: str, split: str, k: int) -> dict[str, float]:
    rows, flags = [], []
    for silo in silos.values():
        if platform not in silo.platforms:
            continue
        for ex in eval_examples(silo, catalogue, split, k):
            if catalogue.items[ex.target.item_id].platform != platform:
                continue
            if migration_defined(ex.history, ex.target, catalogue):
                rows.append(propensity_signals(ex.history, catalogue, k, ex.target))
                flags.append(ex.migrating)
    if not rows:
        return {}
    return {name: roc_auc([r[name] for r in rows], flags) for name in rows[0]} | {"users": float(len(rows))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.evaluation.migration_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=BUNDLED, help="dataset folder (default: the bundled one)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.3, 1.0, 3.0],
                        help="migration-aware loss weights λ to fit (default: 0.3 1 3)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default: 200)")
    args = parser.parse_args(argv)
    catalogue, silos = load_dataset(args.dataset)
    k, split = DEFAULT_K, "valid"
    print(f"whether: ROC-AUC of user-level signals against the migration flag ({split} users, k={k})")
    for platform in catalogue.platforms:
        aucs = propensity_auc(catalogue, silos, platform, split, k)
        if aucs:
            users = int(aucs.pop("users"))
            print(f"  {platform} ({users} users): " + ", ".join(f"{n} {v:.3f}" for n, v in aucs.items()))
    stats = TrainStats(catalogue, silos)
    predictors = [MostPopular(stats), CategoryMarkov(stats), HistoryLogit(stats, silos, k)]
    predictors += [HistoryLogit(stats, silos, k, migration_weight=w) for w in args.weights if w > 0]
    result = evaluate(predictors, catalogue, silos, split, k=k, reps=args.bootstrap, cross=False,
                      reference="category-markov")
    print(f"where: next-interest metrics ({split} users, 95 % paired-bootstrap intervals, {args.bootstrap} resamples)")
    for group in [*catalogue.platforms, "overall", *([SWITCH] if SWITCH in result["users"] else [])]:
        print(f"  {group}")
        for name, out in result["methods"].items():
            if group not in out:
                continue
            cells = []
            for key, label in SHOWN:
                e = out[group][key]
                cells.append(f"{label} n/a" if e["value"] is None else
                             f"{label} {e['value']:.3f} [{e['ci95'][0]:.3f},{e['ci95'][1]:.3f}]")
            print(f"    {name:24s} " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
