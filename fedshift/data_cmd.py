"""`fedshift data validate|describe`: check a dataset folder and summarise it."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from shared_model.dataset import DEFAULT_DATASET, load_dataset, validate_dataset
from shared_model.examples import DEFAULT_K, is_migrating, migration_defined
from shared_model.schema import SPLITS, Catalogue, DataError, Silo

MAX_SHOWN = 50


def _print_problems(problems: list, stream=None) -> None:
    stream = stream or sys.stdout
    for p in problems[:MAX_SHOWN]:
        print(p, file=stream)
    if len(problems) > MAX_SHOWN:
        print(f"... and {len(problems) - MAX_SHOWN} more problems", file=stream)


def run_validate(args: argparse.Namespace) -> int:
    """Exit 0 when the dataset is valid, 2 (one line per problem) otherwise."""
    problems = validate_dataset(Path(args.dir))
    if problems:
        _print_problems(problems)
        return 2
    print(f"{args.dir}: ok")
    return 0


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def silo_summary(silo: Silo, catalogue: Catalogue, k: int = DEFAULT_K) -> dict[str, Any]:
    """Users, events, items, classes, history lengths and migration rate of one silo."""
    items = catalogue.items
    lengths = [len(h) for h in silo.histories.values()]
    item_ids = {e.item_id for h in silo.histories.values() for e in h}
    classes = Counter(items[e.item_id].interest for h in silo.histories.values() for e in h if items[e.item_id].interest)
    defined = migrating = 0
    for h in silo.histories.values():
        if migration_defined(h[:-1], h[-1], catalogue):
            defined += 1
            migrating += is_migrating(h[:-1], h[-1], catalogue, k)
    return {
        "name": silo.name,
        "platform": silo.platform,
        "users": len(silo.splits),
        "users_by_split": {s: len(silo.users(s)) for s in SPLITS},
        "events": sum(lengths),
        "items": len(item_ids),
        "classes": len(classes),
        "history_length": {"min": min(lengths, default=0), "median": _num(statistics.median(lengths)) if lengths else 0,
                           "max": max(lengths, default=0)},
        "migration_rate": round(migrating / defined, 4) if defined else None,
        "migration_users": defined,
    }


def describe(dataset_dir: Path, k: int | None = None, base_model: str | None = None) -> dict[str, Any]:
    """The summary printed by ``fedshift data describe --json`` (raises DataError on bad data)."""
    catalogue, silos = load_dataset(dataset_dir, base_model)
    info_k = k
    if info_k is None:
        from shared_model.dataset import load_dataset_info
        info_k = int(load_dataset_info(dataset_dir).get("migration_k", DEFAULT_K))
    platforms: dict[str, Any] = {}
    for plat in catalogue.platforms:
        its = [catalogue.items[i] for i in catalogue.platform_item_ids(plat)]
        counts = Counter(it.interest for it in its if it.interest)
        labelled = sum(counts.values())
        platforms[plat] = {
            "items": len(its),
            "interest": catalogue.interest_choice.get(plat),
            "interest_coverage": round(labelled / len(its), 4) if its else None,
            "largest_class_share": round(max(counts.values()) / labelled, 4) if labelled else None,
            "classes": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        }
    users = set().union(*(s.splits for s in silos.values())) if silos else set()
    return {
        "dataset": str(dataset_dir),
        "migration_k": info_k,
        "users": len(users),
        "platforms": platforms,
        "silos": [silo_summary(s, catalogue, info_k) for s in silos.values()],
    }


def _choice_text(c: dict[str, Any] | None) -> str:
    if not c:
        return "no interest classes"
    if c["level"] is None:
        d = c.get("derived") or {}
        why = "no category level reached by half the items" if c["rule_level"] is None else "dataset.json asks for it"
        return f"derived interests (k-means k={d.get('k')}, seed {d.get('seed')}; {why})"
    return f"interest level {c['level']} ({c['source']}; the rule gives {c['rule_level']})"


def _text(d: dict[str, Any]) -> str:
    lines = [f"dataset {d['dataset']}: {len(d['silos'])} silos, {d['users']} users, migration k={d['migration_k']}"]
    for plat, p in d["platforms"].items():
        share = "n/a (no labelled items)" if p["largest_class_share"] is None else f"{p['largest_class_share']:.1%}"
        cover = "n/a" if p["interest_coverage"] is None else f"{p['interest_coverage']:.1%}"
        lines.append(f"platform {plat}: {p['items']} items, {_choice_text(p['interest'])}: {len(p['classes'])} classes, "
                     f"largest {share}, coverage {cover}")
        for c, n in p["classes"].items():
            lines.append(f"  {n:7d}  {c}")
    lines.append(f"{'silo':<14}{'platform':<10}{'users':>7}{'events':>9}{'items':>7}{'classes':>8}  {'hist min/med/max':<18}{'migration':>9}")
    for s in d["silos"]:
        h = s["history_length"]
        rate = "n/a" if s["migration_rate"] is None else f"{s['migration_rate']:.1%}"
        lines.append(f"{s['name']:<14}{s['platform']:<10}{s['users']:>7}{s['events']:>9}{s['items']:>7}{s['classes']:>8}  "
                     f"{str(h['min']) + '/' + str(h['median']) + '/' + str(h['max']):<18}{rate:>9}")
    return "\n".join(lines)


def run_describe(args: argparse.Namespace) -> int:
    """Print the summary (text or JSON); exit 2 with problem lines on bad data."""
    try:
        d = describe(Path(args.dir), args.k, args.base_model or None)
    except DataError as e:
        _print_problems(e.problems)
        return 2
    print(json.dumps(d, indent=2) if args.json else _text(d))
    return 0


VALIDATE_HELP = """\
Check every file of a dataset folder against docs/data-format.md without writing anything.
Prints one line per problem as FILE:LINE: FIELD: REASON (the first 50) and exits 2 when the
data is bad; prints "DIR: ok" and exits 0 when it is valid. Checked: missing files and
columns, wrong delimiter, undecodable bytes, empty files, duplicate or unknown item ids,
unknown platforms, empty titles, non-integer or negative order, unknown event types and
splits, users in two splits, and silos that mix platforms."""

DESCRIBE_HELP = """\
Load a dataset (default: the bundled Amazon Arts-Office data) and print its silos and, per
silo, users, events, distinct items, interest classes, history length (min/median/max) and
the interest-migration rate of the users' next events (share whose interest class is not
among their last k events; k from dataset.json, default 5). Per platform it prints how the
interest classes were chosen (the category level by the rule of docs/data-format.md or
dataset.json, or derived from item text when no level covers half the items), the class
counts, the largest class's share and the coverage. Exits 2 with FILE:LINE: FIELD: REASON
lines on bad data."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` with its ``validate`` and ``describe`` sub-commands."""
    p = subparsers.add_parser("data", help="validate or describe a dataset folder",
                              description="Inspect fedshift dataset folders (format: docs/data-format.md).")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True
    v = sub.add_parser("validate", help="check a dataset folder; exit 2 on bad data", description=VALIDATE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("dir", metavar="DIR", type=Path, help="dataset folder (holds items.csv[.gz] and silos/)")
    v.set_defaults(func=run_validate)
    d = sub.add_parser("describe", help="summarise a dataset's silos, classes and migration rates",
                       description=DESCRIBE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("dir", metavar="DIR", type=Path, nargs="?", default=DEFAULT_DATASET,
                   help=f"dataset folder (default: the bundled {DEFAULT_DATASET.name})")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.add_argument("--base-model", default="", metavar="DIR",
                   help="BERT folder whose item embeddings derive interests (default: the bundled encoder)")
    d.add_argument("-k", type=int, default=None, help="migration window: last K events (default: dataset.json or 5)")
    d.set_defaults(func=run_describe)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m fedshift.data_cmd validate|describe …`` (same as ``fedshift data …``)."""
    parser = argparse.ArgumentParser(prog="fedshift")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
