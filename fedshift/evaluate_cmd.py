"""``fedshift evaluate``: offline, centralised evaluation of a checkpoint and the baselines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedshift.torch_threads import restores_torch_threads
from shared_model.config import RunConfig
from shared_model.dataset import list_silos, load_dataset, load_dataset_info, load_silo
from shared_model.examples import DEFAULT_K
from shared_model.schema import DataError

DESCRIPTION = """\
Evaluate a checkpoint (and the non-learned baselines, in the same harness) on the
held-out users of one split, centrally: the whole dataset is read locally.

Groups (a silo holds one platform, or several: a region silo, whose histories mix
platforms and whose users have a held-out next item per platform):
  each platform P       within platform: the held-out next items on P, from every
                        silo holding P, given the user's whole history on that silo
  overall               the platforms' groups pooled
  switch                the cases of the platform groups whose last history event
                        is on another platform than the target (region silos only;
                        left out when there is none; its cases are also in their
                        platform's group, so overall counts them once)
  A->B                  cold start: users with a held-out next item on B, given only
                        their earlier events on A (from any silo, same user id)

Metrics, each with a 95% paired-bootstrap interval over users:
  hr10, ndcg10, mrr     next item: rank of the held-out item in a full ranking over
                        the target platform's catalogue; the user's history items
                        are excluded from the candidates (the target never is)
  category-acc1/-acc3   next interest: interest class in the top 1 / top 3
  ...-migrating         the same on users whose next category is not among their
                        last k categories on the target's platform (k = migration-k)
  new-interest-acc1-migrating
                        on those users: is the most probable category outside
                        their last k categories the one they moved to ("where
                        to", given that they move)
  migration-auc         ROC-AUC of the migration score (Jensen-Shannon divergence,
                        bits, between the predicted next-interest distribution and
                        the last k events' category distribution) against that flag
  migration-auc-mass    ROC-AUC of the predicted mass outside the last k categories

Baselines (fitted on the train split only): most-popular (also the majority-class
category predictor), category-markov, history-logit (the next-interest head's
conditional logit over the same history features, fitted centrally and without
noise: what that head could reach), item-cooccurrence (centralised, non-private
upper reference).
"""

EPILOG = """\
examples:
  fedshift evaluate --checkpoint runs/quick/checkpoints/round-003 --split test
  fedshift evaluate --checkpoint RUN/checkpoints/round-003 --against RUN/checkpoints/round-000 \
      --no-baselines          # did training help? paired Δ = round-003 − round-000 per user
  fedshift evaluate --layout regions --split test --checkpoint REGIONS/checkpoints/round-005 \
      --against PLATFORMS/checkpoints/round-005 --against-own-platform --no-baselines
                              # a region federation against a platform federation, paired
  fedshift evaluate --split test --json > baselines.json   # baselines only
exit status: 0 ok; 1 a predictor's scores are not finite (the message names it), or
--public-key was given and the checkpoint does not verify (`fedshift verify`);
2 bad input (missing checkpoint, bad data, a catalogue other than the checkpoint's: the
message names the file and field).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint and baselines on held-out users",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (checkpoints/round-NNN); "
                   "omit it to evaluate the baselines alone")
    p.add_argument("--against", metavar="DIR", help="a second checkpoint (e.g. the run's round-000, the untrained "
                   "model), scored on the same users as 'against'; the paired Δ is then checkpoint − against "
                   "unless --reference says otherwise")
    p.add_argument("--against-own-platform", action="store_true",
                   help="the --against checkpoint reads only each history's events on the target's platform, as "
                        "a one-platform silo holds that user: with --layout regions and a checkpoint of the "
                        "platforms layout as --against, a region federation against a platform federation on the "
                        "same users and targets, paired (cold start: no history)")
    p.add_argument("--public-key", metavar="KEY", help="verify the checkpoint against the run's signed manifest "
                   "first (RUN/server-signing.pub; see `fedshift verify`)")
    p.add_argument("--split", choices=("valid", "test"), default="valid",
                   help="held-out users to evaluate on (default: valid)")
    p.add_argument("--layout", metavar="NAME", help="the dataset's layout: platforms (the folder itself) or "
                   "layouts/NAME/, e.g. regions (default: the checkpoint's run dataset as it is)")
    p.add_argument("--dataset", metavar="DIR", help="dataset folder (default: the checkpoint's run dataset, "
                   "else the bundled one)")
    p.add_argument("--base-model", metavar="DIR", help="base encoder folder, if it moved since training")
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--no-baselines", action="store_true", help="evaluate the checkpoint only")
    p.add_argument("--no-cross", action="store_true", help="skip the cold-start A->B groups (switch, a "
                   "subset of the platform groups, is still shown)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default: 1000)")
    p.add_argument("--max-users", type=int, default=0, metavar="N",
                   help="evaluate a seeded random subset of at most N users per platform and A->B group "
                        "(switch: those of the platform groups' subsets that switch) (default: all)")
    p.add_argument("--reference", default=None, metavar="METHOD",
                   help="method that every other one is compared with, per user and paired "
                        "(default: 'against' with --against, else most-popular; 'none' to skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the user subset (default: 0)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device for the checkpoint (default: cpu)")
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"fedshift evaluate: {msg}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    from simulations.evaluation import ModelPredictor, OwnPlatformHistory, all_baselines, evaluate, format_table

    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.checkpoint is None and args.no_baselines:
        return _fail("nothing to evaluate: give --checkpoint or drop --no-baselines")
    if args.against and not args.checkpoint:
        return _fail("--against compares with a checkpoint: give --checkpoint")
    if args.against_own_platform and not args.against:
        return _fail("--against-own-platform changes how --against reads histories: give --against")
    reference = args.reference or ("against" if args.against else "most-popular")
    if args.bootstrap < 0 or args.max_users < 0:
        return _fail("--bootstrap and --max-users must be >= 0")
    if args.public_key:
        if not args.checkpoint:
            return _fail("--public-key verifies a checkpoint: give --checkpoint")
        from fedshift.verify_cmd import check

        if (status := check(args.checkpoint, args.public_key, "evaluate")) != 0:
            return status
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    predictors = []
    k = None
    dataset = Path(args.dataset).expanduser() if args.dataset else None
    if args.layout:
        from shared_model.layouts import layout_dir

        try:
            dataset = layout_dir(dataset or RunConfig().dataset_dir(), args.layout)
        except ValueError as e:
            return _fail(str(e))
    t0 = time.perf_counter()
    try:
        if args.checkpoint:
            from shared_model.scorer import Scorer

            scorer = Scorer.from_checkpoint(args.checkpoint, dataset, args.base_model, device=args.device)
            dataset = scorer.dataset_dir
            k = scorer.cfg.migration_k
            predictors.append(ModelPredictor(scorer, "checkpoint"))
            log(f"checkpoint {args.checkpoint}: loaded in {sum(scorer.timings.values()):.1f} s "
                f"(item index: {scorer.index_info.source})")
            if args.against:
                # checked against the same dataset's catalogue, as the first one was
                other = Scorer.from_checkpoint(args.against, dataset, args.base_model, device=args.device)
                against = ModelPredictor(other, "against")
                predictors.append(OwnPlatformHistory(against, scorer.catalogue) if args.against_own_platform
                                  else against)
        dataset = dataset or RunConfig().dataset_dir()
        if not dataset.is_dir():
            return _fail(f"{dataset}: dataset folder not found")
        if predictors:  # the checkpoint's catalogue: derived interests come from its encoder
            catalogue = scorer.catalogue
            silos = {s: load_silo(dataset / "silos" / s, catalogue) for s in list_silos(dataset)}
        else:
            catalogue, silos = load_dataset(dataset, args.base_model or None)
        if not silos:
            return _fail(f"{dataset}/silos: no silo folders")
        if k is None:
            k = int(load_dataset_info(dataset).get("migration_k", DEFAULT_K))
        if not args.no_baselines:
            predictors = [*predictors, *all_baselines(catalogue, silos)]
    except FileNotFoundError as e:
        return _fail(str(e))
    except DataError as e:
        return _fail(f"bad data in {dataset or 'the checkpoint dataset'}:\n{e}")
    except (ValueError, KeyError) as e:
        return _fail(str(e))
    from shared_model.scoring import ScoringError

    try:
        result = evaluate(predictors, catalogue, silos, args.split, k=k, reps=args.bootstrap, seed=args.seed,
                          max_users=args.max_users, cross=not args.no_cross,
                          reference=None if reference == "none" else reference,
                          progress=lambda s: print(f"  {s}", file=sys.stderr))
    except ScoringError as e:  # a predictor produced non-finite scores: no figure for it
        print(f"fedshift evaluate: {e}", file=sys.stderr)
        return 1
    result["dataset"] = str(dataset)
    result["checkpoint"] = str(args.checkpoint) if args.checkpoint else None
    result["against"] = str(args.against) if args.against else None
    result["against-own-platform"] = bool(args.against_own_platform)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(format_table(result))
        print(f"\n{result['seconds']} s" + (f"; JSON: {args.out}" if args.out else ""))
    return 0


run = restores_torch_threads(_run)
