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
from shared_model.layouts import layout_dir, layouts
from shared_model.examples import DEFAULT_K, is_migrating, migration_defined
from shared_model.schema import SPLITS, Catalogue, DataError, Event, Silo, held_out

MAX_SHOWN = 50


def _print_problems(problems: list, stream=None) -> None:
    stream = stream or sys.stdout
    for p in problems[:MAX_SHOWN]:
        print(p, file=stream)
    if len(problems) > MAX_SHOWN:
        print(f"... and {len(problems) - MAX_SHOWN} more problems", file=stream)


def _layout_folder(args: argparse.Namespace) -> Path | None:
    """The folder of ``--layout`` in DIR, or None after a one-line error on stderr."""
    try:
        return layout_dir(Path(args.dir), args.layout)
    except ValueError as e:
        print(f"fedshift data {args.data_command}: {e}", file=sys.stderr)
        return None


def run_validate(args: argparse.Namespace) -> int:
    """Exit 0 when the dataset (layout) is valid, 2 (one line per problem) otherwise."""
    folder = _layout_folder(args)
    if folder is None:
        return 2
    problems = validate_dataset(folder)
    if problems:
        _print_problems(problems)
        return 2
    print(f"{folder}: ok")
    return 0


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def platform_transitions(history: list[Event], catalogue: Catalogue) -> tuple[int, int]:
    """``(transitions, switches)`` of one user's sorted history: each event that has an event at a
    lower order is one transition from the last of those (the events of one order sort in catalogue
    platform order but none follows another); a *platform switch* when the two are on different
    platforms (docs/data-format.md)."""
    items = catalogue.items
    transitions = switches = 0
    last: Event | None = None  # the last event at a lower order than the current group's
    i = 0
    while i < len(history):
        j = i
        while j < len(history) and history[j].order == history[i].order:
            j += 1
        if last is not None:
            before = items[last.item_id].platform
            transitions += j - i
            switches += sum(items[e.item_id].platform != before for e in history[i:j])
        last = history[j - 1]
        i = j
    return transitions, switches


def silo_summary(silo: Silo, catalogue: Catalogue, k: int = DEFAULT_K) -> dict[str, Any]:
    """Users, events, items, classes, history lengths, platforms and switches, and migration
    rate of one silo. The next events of a user are the events at the user's highest order
    (:func:`held_out`; one per platform on a region silo), each judged with the history before
    that order, as the evaluation examples are."""
    items = catalogue.items
    lengths = [len(h) for h in silo.histories.values()]
    item_ids = {e.item_id for h in silo.histories.values() for e in h}
    classes = Counter(items[e.item_id].interest for h in silo.histories.values() for e in h if items[e.item_id].interest)
    defined = migrating = 0
    migration_users: set[str] = set()
    targets = target_switches = transitions = switches = multi = 0
    for u, h in silo.histories.items():
        multi += len({items[e.item_id].platform for e in h}) > 1
        t, sw = platform_transitions(h, catalogue)
        transitions += t
        switches += sw
        cut = held_out(h)
        history = h[:cut]
        for target in h[cut:]:
            if history:
                targets += 1
                target_switches += items[target.item_id].platform != items[history[-1].item_id].platform
            if migration_defined(history, target, catalogue):
                defined += 1
                migration_users.add(u)
                migrating += is_migrating(history, target, catalogue, k)
    one = {"platform": silo.platforms[0]} if len(silo.platforms) == 1 else {}
    return {
        "name": silo.name,
        **one,
        "platforms": list(silo.platforms),
        "users": len(silo.splits),
        "users_by_split": {s: len(silo.users(s)) for s in SPLITS},
        "multi_platform_users": multi,
        "events": sum(lengths),
        "items": len(item_ids),
        "classes": len(classes),
        "history_length": {"min": min(lengths, default=0), "median": _num(statistics.median(lengths)) if lengths else 0,
                           "max": max(lengths, default=0)},
        "transitions": transitions,
        "platform_switches": switches,
        "switch_rate": round(switches / transitions, 4) if transitions else None,
        "targets": targets,
        "target_switches": target_switches,
        "target_switch_rate": round(target_switches / targets, 4) if targets else None,
        "migration_rate": round(migrating / defined, 4) if defined else None,
        "migration_targets": defined,
        "migration_users": len(migration_users),
    }


def describe(dataset_dir: Path, k: int | None = None, base_model: str | None = None,
             layout: str | None = None) -> dict[str, Any]:
    """The summary printed by ``fedshift data describe --json`` of one layout of a dataset
    (default ``platforms``: the folder itself). Raises DataError on bad data and ValueError for a
    layout the dataset does not have."""
    folder = layout_dir(dataset_dir, layout)
    catalogue, silos = load_dataset(folder, base_model)
    info_k = k
    if info_k is None:
        from shared_model.dataset import load_dataset_info
        info_k = int(load_dataset_info(folder).get("migration_k", DEFAULT_K))
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
        "layout": layout or "platforms",
        "layouts": layouts(dataset_dir),
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


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _text(d: dict[str, Any]) -> str:
    lines = [f"dataset {d['dataset']}: {len(d['silos'])} silos, {d['users']} users, migration k={d['migration_k']}"]
    if "layout" in d:
        lines.append(f"layout {d['layout']} (layouts: {', '.join(d['layouts'])})")
    for plat, p in d["platforms"].items():
        share = "n/a (no labelled items)" if p["largest_class_share"] is None else f"{p['largest_class_share']:.1%}"
        cover = "n/a" if p["interest_coverage"] is None else f"{p['interest_coverage']:.1%}"
        lines.append(f"platform {plat}: {p['items']} items, {_choice_text(p['interest'])}: {len(p['classes'])} classes, "
                     f"largest {share}, coverage {cover}")
        for c, n in p["classes"].items():
            lines.append(f"  {n:7d}  {c}")
    names = [s.get("platforms") or [s["platform"]] for s in d["silos"]]
    pw = max([10, *(len("+".join(n)) + 2 for n in names)])
    lines.append(f"{'silo':<14}{'platforms':<{pw}}{'users':>7}{'multi':>7}{'events':>9}{'items':>7}{'classes':>8}  "
                 f"{'hist min/med/max':<18}{'switches':>9}{'rate':>7}{'target sw':>10}{'migration':>10}")
    for s, plats in zip(d["silos"], names):
        h = s["history_length"]
        lines.append(f"{s['name']:<14}{'+'.join(plats):<{pw}}{s['users']:>7}{s.get('multi_platform_users', 0):>7}"
                     f"{s['events']:>9}{s['items']:>7}{s['classes']:>8}  "
                     f"{str(h['min']) + '/' + str(h['median']) + '/' + str(h['max']):<18}"
                     f"{s.get('platform_switches', 0):>9}{_pct(s.get('switch_rate')):>7}"
                     f"{_pct(s.get('target_switch_rate')):>10}{_pct(s['migration_rate']):>10}")
    lines.append("multi: users with events on more than one platform. switches: events on another platform than the "
                 "user's previous event\n(rate: of all transitions). target sw: next events (a user's events at the "
                 "highest order) on another platform\nthan the last event before them. migration: of the next events, "
                 "on the next event's platform.")
    return "\n".join(lines)


def run_describe(args: argparse.Namespace) -> int:
    """Print the summary (text or JSON); exit 2 with problem lines on bad data or an unknown layout."""
    if _layout_folder(args) is None:
        return 2
    try:
        d = describe(Path(args.dir), args.k, args.base_model or None, args.layout)
    except DataError as e:
        _print_problems(e.problems)
        return 2
    print(json.dumps(d, indent=2) if args.json else _text(d))
    return 0


VALIDATE_HELP = """\
Check every file of a dataset folder (or of one of its layouts, --layout) against
docs/data-format.md without writing anything. Prints one line per problem as
FILE:LINE: FIELD: REASON (the first 50) and exits 2 when the data is bad; prints "DIR: ok"
(the layout's folder) and exits 0 when it is valid. Checked: missing files and columns, wrong delimiter,
undecodable bytes, empty files, duplicate or unknown item ids, unknown platforms, empty
titles, non-integer, negative or duplicate order (per user and platform), unknown event
types and splits, users in two splits, silos that mix platforms without a silo.json
declaring them, a malformed silo.json and events on a platform it does not declare.
An unknown --layout is a one-line error and exit 2."""

DESCRIBE_HELP = """\
Load a dataset (default: the bundled Amazon Arts-Office data; --layout picks another of its
layouts, e.g. regions) and print the layouts it offers, its silos and, per silo, its
platforms, users, users with events on more than one platform, events, distinct items,
interest classes, history length (min/median/max), platform switches (an event on another
platform than the user's previous one, of all transitions), the share of next events on
another platform than the last event before them, and the interest-migration rate of the
next events (share whose interest class is not among the last k events on the next event's
platform; k from dataset.json, default 5). A user's next events are the events at the
user's highest order (one per platform on a region silo). Per platform it prints how the
interest classes were chosen (the category level by the rule of docs/data-format.md or
dataset.json, or derived from item text when no level covers half the items), the class
counts, the largest class's share and the coverage. Exits 2 with FILE:LINE: FIELD: REASON
lines on bad data, and with a one-line error for an unknown layout."""

LAYOUT_HELP = ("which layout of DIR: platforms (the folder itself, the default) or a layouts/NAME/ folder "
               "(the bundled data has regions)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` with its ``validate`` and ``describe`` sub-commands."""
    p = subparsers.add_parser("data", help="validate or describe a dataset folder",
                              description="Inspect fedshift dataset folders (format: docs/data-format.md).")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True
    v = sub.add_parser("validate", help="check a dataset folder; exit 2 on bad data", description=VALIDATE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("dir", metavar="DIR", type=Path, help="dataset folder (holds items.csv[.gz] and silos/)")
    v.add_argument("--layout", default="platforms", metavar="NAME", help=LAYOUT_HELP)
    v.set_defaults(func=run_validate)
    d = sub.add_parser("describe", help="summarise a dataset's silos, classes and migration rates",
                       description=DESCRIBE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("dir", metavar="DIR", type=Path, nargs="?", default=DEFAULT_DATASET,
                   help=f"dataset folder (default: the bundled {DEFAULT_DATASET.name})")
    d.add_argument("--layout", default="platforms", metavar="NAME", help=LAYOUT_HELP)
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
