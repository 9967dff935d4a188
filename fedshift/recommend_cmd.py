"""``fedshift recommend``: top-k next items and next interests for a typed history."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedshift.torch_threads import restores_torch_threads
from shared_model.schema import DataError

DESCRIPTION = """\
Recommend the next items on one platform for a history of item titles, with the
predicted next interests (the platform's interest classes) and the migration score.

History: --history "title; title; ..." (separated by ';', oldest first) or
--history-file F (one title per line; blank lines and lines starting with '#' are
skipped). A title equal to a catalogue item's title (any platform, case-insensitive)
stands for that item and is shown to the model as "category | title"; any other text is
used as is, as " | text". Matched items of the requested platform are not recommended.
Titles that contain ';' need --history-file.

Migration score: Jensen-Shannon divergence (bits, 0..1) between the predicted
next-interest distribution and the category distribution of the last k matched history
items on the requested platform (k = the checkpoint's migration-k; a history from other
platforms only is a cold start there: null), as migration is defined (docs/data-format.md);
null when none of them has a category.
"If moving": the most probable category outside those recent ones, i.e. where the user
is predicted to go if they leave their recent interests, with its share of the
predicted mass outside them (JSON: new_interest; null when undefined).

The catalogue's item embeddings are computed once per checkpoint and cached beside it
(DIR/item-index.pt, keyed by the checkpoint files' and the catalogue's hashes; rebuilt
when either changes). The timing line shows load, index and scoring times.
"""

EPILOG = """\
examples:
  fedshift recommend --checkpoint runs/quick/checkpoints/round-003 --platform office \\
      --history "Prismacolor Premier Colored Pencils; Strathmore Sketch Pad"
  fedshift recommend --checkpoint DIR --platform arts --history-file h.txt -k 5 --json
  fedshift recommend --checkpoint DIR --platform arts --history "..." --bench 1000
exit status: 0 ok; 1 the model's scores are not finite, or --public-key was given and the
checkpoint does not verify (`fedshift verify`); 2 unknown platform, empty history, missing
or unloadable checkpoint, file or key.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="top-k next items and interests for a history of titles",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="DIR", required=True, help="checkpoint folder (checkpoints/round-NNN)")
    p.add_argument("--public-key", metavar="KEY", help="verify the checkpoint against the run's signed manifest "
                   "first (RUN/server-signing.pub; see `fedshift verify`)")
    p.add_argument("--platform", required=True, metavar="P", help="platform to recommend on (e.g. arts, office)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--history", metavar="TITLES", help="titles separated by ';', oldest first")
    src.add_argument("--history-file", metavar="F", help="file with one title per line, oldest first")
    p.add_argument("-k", type=int, default=10, help="number of items to return (default: 10)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--dataset", metavar="DIR", help="dataset whose catalogue to use (default: the checkpoint's run dataset)")
    p.add_argument("--base-model", metavar="DIR", help="base encoder folder, if it moved since training")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (default: 1; one short history gains little from more, and "
                        "oversubscribed cores make multi-threaded inference much slower)")
    p.add_argument("--bench", type=int, default=0, metavar="N",
                   help="also time N warm in-process calls and print p50/p99 latency")
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"fedshift recommend: {msg}", file=sys.stderr)
    return 2


def read_history(args: argparse.Namespace) -> list[str]:
    if args.history_file:
        path = Path(args.history_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: history file not found")
        lines = path.read_text(encoding="utf-8").splitlines()
        return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return [t.strip() for t in (args.history or "").split(";") if t.strip()]


def _run(args: argparse.Namespace) -> int:
    from shared_model.recommender import Recommender, percentile_ms
    from shared_model.scorer import Scorer
    from shared_model.scoring import ScoringError

    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.k < 1:
        return _fail("-k must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        titles = read_history(args)
    except (FileNotFoundError, UnicodeDecodeError) as e:
        return _fail(str(e))
    if not titles:
        return _fail("empty history: give at least one title (--history \"a; b\" or --history-file F)")
    if not Path(args.checkpoint).is_dir():
        return _fail(f"{args.checkpoint}: checkpoint folder not found")
    if args.public_key:
        from fedshift.verify_cmd import check

        if (status := check(args.checkpoint, args.public_key, "recommend")) != 0:
            return status
    try:
        scorer = Scorer.from_checkpoint(args.checkpoint, args.dataset, args.base_model)
    except (FileNotFoundError, ValueError, KeyError) as e:
        return _fail(str(e))
    except DataError as e:
        return _fail(f"bad catalogue:\n{e}")
    if args.platform not in scorer.catalogue.platforms:
        return _fail(f"unknown platform {args.platform!r}; known: {', '.join(scorer.catalogue.platforms)}")
    rec = Recommender(scorer)
    try:
        result = rec.recommend(args.platform, titles, args.k)
    except ScoringError as e:
        print(f"fedshift recommend: {e}", file=sys.stderr)
        return 1
    timing = {name: round(v * 1000, 1) for name, v in scorer.timings.items()}
    timing["score"] = round(result.pop("score_seconds") * 1000, 2)
    result["timing_ms"] = timing
    result["index"] = {"path": scorer.index_info.path, "source": scorer.index_info.source,
                       "items": len(scorer.index.item_ids)}
    if args.bench:
        samples = []
        for _ in range(args.bench):
            t = time.perf_counter()
            rec.recommend(args.platform, titles, args.k)
            samples.append(time.perf_counter() - t)
        result["bench"] = {"calls": args.bench, "p50_ms": round(percentile_ms(samples, 50), 2),
                           "p99_ms": round(percentile_ms(samples, 99), 2)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    matched = sum(1 for h in result["history"] if h["item_id"])
    print(f"history: {len(titles)} entries, {matched} matched to catalogue items")
    print(f"top {len(result['items'])} on {args.platform}:")
    for it in result["items"]:
        print(f"  {it['rank']:>3}. {it['score']:>8.3f}  [{it['category'] or '-'}] {it['title']}  ({it['item_id']})")
    print("next interests:")
    for i in result["interests"][:5]:
        print(f"  {i['probability']:.3f}  {i['category']}")
    ms = result["migration_score"]
    print(f"migration score (JS, bits): {'n/a (no categorised history item)' if ms is None else f'{ms:.3f}'}")
    move = result["new_interest"]
    if move:
        print(f"if moving: {move['category']} ({move['probability_if_moving']:.3f} of the predicted mass outside "
              f"the recent categories; {result['migration_outside_recent_mass']:.3f} of all mass is outside)")
    idx = result["index"]
    print(f"timing: load model {timing['load-model']:.0f} ms, catalogue {timing['load-catalogue']:.0f} ms, "
          f"item index {timing['item-index']:.0f} ms ({idx['source']}: {idx['path']}, {idx['items']} items), "
          f"score {timing['score']:.1f} ms against {result['candidates']} {args.platform} items")
    if args.bench:
        b = result["bench"]
        print(f"latency over {b['calls']} warm calls: p50 {b['p50_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms")
    return 0


run = restores_torch_threads(_run)
