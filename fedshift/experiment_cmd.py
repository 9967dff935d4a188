"""``fedshift experiment``: the experiment grid (baselines, federated DP at several ε,
federated and centralised non-private, local-only, leave-one-platform-out) in one harness."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from fedshift.config_args import SetError, add_set_argument, parse_set, refuse
from fedshift.torch_threads import restores_torch_threads

DESCRIPTION = """\
Train and evaluate every method of a preset's grid on the same held-out users, and write
a results table with 95% paired-bootstrap intervals over users.

Methods:
  most-popular, category-markov, history-logit, item-cooccurrence
                          non-learned baselines (train split, centralised, not private)
  federated-dp-epsE       a federated simulation (fedshift simulate) with budget E on
                          every silo (last checkpoint)
  federated-nonprivate    the same without DP
  local-only-epsE         one simulation per silo on a dataset view holding only that
                          silo, same E; each user is scored by their own silo's model
  centralised-nonprivate  the converged ceiling: every silo's training users pooled, no
                          DP, exact popularity and transitions, epochs with early
                          stopping on validation NDCG@10 and a learning-rate search
                          (user-tower = text: the same number of gradient steps as
                          all silos of a federated run)
  lopo-A-to-B-epsE        federated DP on platform A's silos only, evaluated on B's users
                          (zero-shot transfer through the text encoder)

Every metric (HR@10, NDCG@10, MRR, next-category accuracy @1/@3, on migrating users,
migration AUC) carries a 95% percentile interval from a bootstrap over users with the
same draws for every method (paired); Δ NDCG@10 is the per-user paired difference to
most-popular. Per silo, federated DP against local-only DP at the same ε on that silo's
users, with the paired interval of the difference (Table 4; the paper preset's unequal
silos make one small region per platform). Learning curves: validation NDCG@10 of every
round's checkpoint against cumulative DP steps, for federated DP, federated non-private and
local-only (Table 5). Nothing is tuned: the preset fixes every hyper-parameter; validation
users only feed the curves, test users only the tables.

Presets:
{presets}

Writes to OUT: results.md (tables + caption), results.csv (one row per method and
group, value/low/high/n per metric), per-silo.csv, learning-curve.csv, results.json, the plots
{plots},
runs/<run>/ (each training run's full output: metrics.json, checkpoints/, ledgers, logs),
views/ (dataset views; small-region-<share>/ is the unequal re-partition).
"""


def description() -> str:
    """:data:`DESCRIPTION` with each preset's numbers taken from the preset itself."""
    import textwrap

    from simulations.experiment.plan import EXPERIMENT_PRESETS, help_text
    from simulations.experiment.plots import PLOTS

    presets = "\n".join(textwrap.fill(help_text(p), width=88, initial_indent=f"  {name:<7} ",
                                       subsequent_indent=" " * 10) for name, p in EXPERIMENT_PRESETS.items())
    return DESCRIPTION.format(presets=presets, plots=textwrap.fill(", ".join(PLOTS), width=88, initial_indent="  ",
                                                                   subsequent_indent="  "))


EPILOG = """\
examples:
  fedshift experiment --preset smoke --out /tmp/smoke
  fedshift experiment --preset paper --dry-run
  fedshift experiment --preset paper --out runs/paper
  fedshift experiment --preset paper --out runs/paper --resume   # after a crash: keeps finished runs
  fedshift experiment --preset paper --layout regions --out runs/regions   # region silos
exit status: 0 ok; 1 a training run failed (its log is named); 2 bad input.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from shared_model.layouts import REGION_OTHER_PLATFORM_LAGS
    from simulations.experiment.plan import EXPERIMENT_PRESETS, PER_RUN_KEYS

    p = sub.add_parser("experiment", help="run the experiment grid and write results.md/.csv and plots",
                       description=description(), epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(EXPERIMENT_PRESETS), default="smoke",
                   help="the grid (default: smoke)")
    p.add_argument("--dataset", metavar="DIR", help="dataset folder (default: smoke generates one, paper uses "
                   "the bundled one)")
    p.add_argument("--layout", metavar="NAME", help="the dataset's layout: platforms (the folder itself, default) "
                   "or a layouts/NAME/ folder, e.g. regions (one silo per region holding every platform: a switch "
                   "group, no leave-one-platform-out, other-platform-lags = "
                   f"{REGION_OTHER_PLATFORM_LAGS} unless --set; the unequal re-partition is not applied)")
    p.add_argument("--base-model", metavar="DIR", help="local BERT checkpoint (default: smoke a tiny random "
                   "BERT, paper the bundled encoder)")
    p.add_argument("--out", metavar="DIR", help="results folder (default: runs/experiment-<timestamp>)")
    p.add_argument("--split", choices=("valid", "test"), help="held-out users of the table (default: test)")
    p.add_argument("--max-users", type=int, metavar="N", help="evaluate a seeded subset of at most N users per "
                   "platform, the same for every method (default: preset; 0 = all)")
    p.add_argument("--bootstrap", type=int, metavar="N", help="bootstrap resamples (default: preset)")
    p.add_argument("--small-region-share", type=float, metavar="SHARE", help="unequal silos: re-partition each "
                   "platform's users (by a hash of the user id, all of a user's splits together) into a large region "
                   "and a small one holding about SHARE of them, in (0, 0.5]; the view is written to OUT/views/ with "
                   "the catalogue hard-linked (default: preset; paper 0.1)")
    p.add_argument("--keep-regions", action="store_true", help="train on the dataset's own silos (no re-partition)")
    p.add_argument("--curve-users", type=int, metavar="N", help="learning curves: a seeded subset of at most N "
                   "validation users per platform (default: preset; 0 = no learning curves)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per training run (default 3600)")
    add_set_argument(p, "override a run-config key of every training run, e.g. --set local-steps=4 "
                     f"(repeatable; not {', '.join(PER_RUN_KEYS)}: the experiment sets those per run)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and time estimate, train nothing")
    p.add_argument("--resume", action="store_true", help="reuse every run in --out that finished with the same "
                   "settings (silos, DP, ε, run-config overrides, dataset, base model; recorded in "
                   "runs/<run>/experiment-run.json) instead of retraining it; evaluation always reruns. "
                   "Code changes are not detected: delete a run's folder to retrain it")
    p.set_defaults(func=run)
    return p


def _run(args: argparse.Namespace) -> int:
    import warnings

    from simulations.experiment.plan import EXPERIMENT_PRESETS, PER_RUN_KEYS, preset_with
    from simulations.experiment.run import run_experiment

    warnings.filterwarnings("ignore", category=FutureWarning)
    preset = EXPERIMENT_PRESETS[args.preset]
    try:
        sets = parse_set(args.set)
        if fixed := sorted(set(sets) & set(PER_RUN_KEYS)):
            raise SetError(f"--set {', '.join(fixed)}: set by the experiment for each run")
        preset = preset_with(preset, overrides={**preset.overrides, **sets} if sets else None)
        preset.config()  # every value checked before anything is created
    except ValueError as e:
        return refuse("experiment", e)
    if args.resume and not args.out:
        print("fedshift experiment: --resume needs --out (the folder of the runs to reuse)", file=sys.stderr)
        return 2
    if (args.max_users is not None and args.max_users < 0) or (args.bootstrap is not None and args.bootstrap < 1):
        print("fedshift experiment: --max-users must be >= 0 and --bootstrap >= 1", file=sys.stderr)
        return 2
    if args.curve_users is not None and args.curve_users < 0:
        print("fedshift experiment: --curve-users must be >= 0", file=sys.stderr)
        return 2
    if args.small_region_share is not None and args.keep_regions:
        print("fedshift experiment: --small-region-share and --keep-regions exclude each other", file=sys.stderr)
        return 2
    if args.small_region_share is not None:
        from simulations.datasets.unequal_regions import check_share

        try:
            check_share(args.small_region_share)
        except ValueError as e:
            return refuse("experiment", e)
    preset = preset_with(preset, split=args.split, max_users=args.max_users,
                         bootstrap=args.bootstrap, small_region_share=args.small_region_share,
                         curve_users=args.curve_users)
    if args.keep_regions:
        preset = replace(preset, small_region_share=None)
    dataset = Path(args.dataset).expanduser() if args.dataset else None
    if dataset is not None and not (dataset / "silos").is_dir():
        print(f"fedshift experiment: {dataset}: not a dataset folder (no silos/)", file=sys.stderr)
        return 2
    layout = args.layout or "platforms"
    notes: list[str] = []
    from shared_model.config import RunConfig
    from shared_model.layouts import has_region_silos, layout_dir

    if layout != "platforms":
        if dataset is None and preset.generated is not None:
            print(f"fedshift experiment: --layout {layout}: the {preset.name} preset's generated dataset has only the "
                  "platforms layout; give --dataset", file=sys.stderr)
            return 2
        try:
            dataset = layout_dir(dataset if dataset is not None else RunConfig().dataset_dir(), layout)
        except ValueError as e:
            return refuse("experiment", e)
    if dataset is not None and preset.small_region_share is not None and has_region_silos(dataset):
        if args.small_region_share is not None:
            print(f"fedshift experiment: --small-region-share: {dataset} has region silos; the unequal re-partition "
                  "handles one-platform silos only", file=sys.stderr)
            return 2
        notes.append(f"{dataset} has region silos: trained on its own silos (the preset's unequal re-partition, "
                     f"share {preset.small_region_share:g}, handles one-platform silos only)")
        preset = replace(preset, small_region_share=None)
    out = Path(args.out).expanduser() if args.out else Path.cwd() / "runs" / datetime.now().strftime("experiment-%Y%m%d-%H%M%S")
    try:
        run_experiment(preset, out, dataset, args.base_model, timeout=args.timeout,
                       log=lambda s: print(s, flush=True), dry_run=args.dry_run, resume=args.resume, layout=layout,
                       notes=notes)
    except RuntimeError as e:
        print(f"fedshift experiment: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"fedshift experiment: {e}", file=sys.stderr)
        return 2
    return 0


run = restores_torch_threads(_run)
