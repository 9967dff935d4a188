"""The experiment's results as files: results.csv (one row per method and group),
results.json (everything), results.md (tables, caption and method notes generated from the
results document, so they say what was run) and the plots (:mod:`simulations.experiment.plots`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared_model.io_utils import csv_bytes, write_bytes_atomic
from simulations.evaluation import METRICS, SWITCH
from simulations.experiment.evaluate import INTEREST_DELTAS, INTEREST_REFERENCE, REFERENCE_DELTAS
from simulations.experiment.curves import CURVE_METRICS
from simulations.experiment.per_silo import SILO_CSV_HEADER, silo_rows
from simulations.experiment.plots import PLOTS, plots

TABLE_METRICS = (("hr10", "HR@10"), ("ndcg10", "NDCG@10"), ("mrr", "MRR"), ("category-acc1", "cat acc@1"),
                 ("category-acc3", "cat acc@3"), ("category-acc1-migrating", "cat acc@1 migrating"),
                 ("new-interest-acc1-migrating", "new-interest acc@1 migrating"), ("migration-auc", "migration AUC"))
DELTA_COLUMNS = (*(f"delta-{m}" for m in REFERENCE_DELTAS), *(f"delta-markov-{m}" for m in INTEREST_DELTAS))


def _main_group(entry: Mapping[str, Any]) -> str:
    groups = entry["groups"]
    return "overall" if "overall" in groups else next(iter(groups))


def _cell(e: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not e or e.get("value") is None:
        return "–"
    lo, hi = e["ci95"]
    fmt = "{:+.3f}" if signed else "{:.3f}"
    ci = f"[{fmt.format(lo)}, {fmt.format(hi)}]" if lo is not None else "[–]"
    return f"{fmt.format(e['value'])} {ci}"


def _eps_cells(entry: Mapping[str, Any]) -> tuple[str, str]:
    if entry["epsilon"] is None:
        return "∞ (non-private)", "–"
    spent = entry.get("epsilon-spent")
    eps = f"{entry['epsilon']:g}" + (f" (spent {spent:.2f})" if spent is not None else "")
    return eps, f"{entry['delta']:g}"


def results_rows(doc: Mapping[str, Any]) -> list[list[Any]]:
    """One CSV row per (method, group)."""
    rows = []
    for name, entry in doc["methods"].items():
        for g, res in entry["groups"].items():
            row: list[Any] = [name, entry["family"], "+".join(entry["train-platforms"]) or "all (train split)", g,
                              res["users"],
                              "inf" if entry["epsilon"] is None else entry["epsilon"],
                              "" if entry.get("epsilon-spent") is None else round(entry["epsilon-spent"], 6),
                              "" if entry["delta"] is None else entry["delta"]]
            for m in (*METRICS, *DELTA_COLUMNS):
                e = res["metrics"].get(m) or {}
                lo, hi = (e.get("ci95") or [None, None])
                row += [_num(e.get("value")), _num(lo), _num(hi), e.get("n", "")]
            rows.append(row)
    return rows


def _num(x: Any) -> Any:
    return "" if x is None else x


def csv_header() -> list[str]:
    head = ["method", "family", "trained-on", "group", "users", "epsilon", "epsilon-spent", "delta"]
    for m in (*METRICS, *DELTA_COLUMNS):
        head += [m, f"{m}-ci95-low", f"{m}-ci95-high", f"{m}-n"]
    return head


def results_markdown(doc: Mapping[str, Any]) -> str:
    methods = doc["methods"]
    head = ["method", "ε (per silo)", "δ", "evaluated on", "users", *(h for _, h in TABLE_METRICS),
            f"Δ NDCG@10 vs {doc['reference']}"]
    lines = [f"# fedshift experiment — preset `{doc['preset']}`", ""]
    caption = (f"**Table 1.** Next-item and next-interest metrics on the held-out **{doc['split']}** users "
               f"({', '.join(f'{g}: {n}' for g, n in doc['users'].items())}"
               + (f"; a seeded subset of ≤{doc['max-users']} per platform" if doc["max-users"] else "; all of them")
               + f"). Each cell: value [95 % paired-bootstrap interval over users, {doc['bootstrap-reps']} resamples; "
               f"the same draws for every method]. Δ: per-user paired difference to {doc['reference']}. "
               f"ε: each silo's total budget for the run (Opacus RDP; spent = the largest cumulative ε reached); "
               f"non-private methods have ε = ∞. 'overall' pools every platform's users; a leave-one-platform-out "
               f"row is evaluated on the platform it never saw. "
               + ("'switch' (region silos): the cases whose last history event is on another platform than the "
                  "target, taken from the platform rows (a region silo's held-out user has one case per platform; "
                  "not added to 'overall'). " if SWITCH in doc["users"] else "")
               + f"{doc['subsampling']}. "
               f"No tuning: every hyper-parameter is fixed by the preset; the test split is used only here. "
               f"Machine: {doc['machine']}; wall time {doc['seconds'] / 60:.1f} min.")
    lines += [caption, ""]
    if doc.get("notes"):
        lines += [*(f"Note: {n}." for n in doc["notes"]), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in methods.items():
        g = _main_group(entry)
        res = entry["groups"][g]
        eps, delta = _eps_cells(entry)
        cells = [f"`{name}`", eps, delta, g, str(res["users"]),
                 *(_cell(res["metrics"].get(m)) for m, _ in TABLE_METRICS),
                 _cell(res["metrics"].get("delta-ndcg10"), signed=True) if name != doc["reference"] else "(reference)"]
        lines.append("| " + " | ".join(cells) + " |")
    interest_head = ["cat acc@1", "cat acc@3", "new-interest acc@1 migrating"]
    lines += ["", f"**Table 1b.** Next interest against `{INTEREST_REFERENCE}`: paired per-user difference "
              "(method − Markov) with its 95 % interval, overall and per platform. A win holds only when the "
              "interval excludes 0. *new-interest acc@1 migrating*: on users whose next category is not among "
              "their last k, is the most probable category outside those k the one they moved to.", "",
              "| method | ε | group | " + " | ".join(f"Δ {h}" for h in interest_head) + " |",
              "|" + "---|" * (3 + len(interest_head))]
    for name, entry in methods.items():
        if name == INTEREST_REFERENCE:
            continue
        eps, _ = _eps_cells(entry)
        for g, res in entry["groups"].items():
            if "->" in g or not any(f"delta-markov-{m}" in res["metrics"] for m in INTEREST_DELTAS):
                continue
            lines.append("| " + " | ".join([f"`{name}`", eps, g, *(
                _cell(res["metrics"].get(f"delta-markov-{m}"), signed=True) for m in INTEREST_DELTAS)]) + " |")
    lines += ["", "**Table 2.** The same per platform (methods evaluated on every platform).", "",
              "| method | ε | δ | platform | users | " + " | ".join(h for _, h in TABLE_METRICS) + " |",
              "|" + "---|" * (5 + len(TABLE_METRICS))]
    for name, entry in methods.items():
        eps, delta = _eps_cells(entry)
        for g, res in entry["groups"].items():
            if g == "overall" or "->" in g or entry["family"] == "lopo":
                continue
            lines.append("| " + " | ".join([f"`{name}`", eps, delta, g, str(res["users"]),
                                             *(_cell(res["metrics"].get(m)) for m, _ in TABLE_METRICS)]) + " |")
    cross_metrics = TABLE_METRICS[:4]
    lines += ["", "**Table 3.** Cross-platform: held-out users of platform B whose input is only their earlier "
              "events on platform A (`A->B`); next item ranked over B's catalogue, next interest among B's "
              "categories. Methods that train one model on both platforms' silos (local-only and "
              "leave-one-platform-out rows are elsewhere); Δ to the reference as in Table 1.", "",
              "| method | ε | δ | group | users | " + " | ".join(h for _, h in cross_metrics) + " | Δ NDCG@10 |",
              "|" + "---|" * (6 + len(cross_metrics))]
    for name, entry in methods.items():
        eps, delta = _eps_cells(entry)
        for g, res in entry["groups"].items():
            if "->" not in g:
                continue
            d = _cell(res["metrics"].get("delta-ndcg10"), signed=True) if name != doc["reference"] else "(reference)"
            lines.append("| " + " | ".join([f"`{name}`", eps, delta, g, str(res["users"]),
                                             *(_cell(res["metrics"].get(m)) for m, _ in cross_metrics), d]) + " |")
    lines += silo_table(doc) + curve_table(doc)
    lines += ["", "## Methods", "", *method_lines(doc), "", "## Training runs", "", "| run | silos | DP | ε | seconds (estimate) |", "|---|---|---|---|---|"]
    for key, r in doc["runs"].items():
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:g}"
        reused = "reused: " if r.get("status") == "reused" else ""
        lines.append(f"| `{key}` | {', '.join(r['silos'])} | {'yes' if r['dp'] else 'no'} | {eps} | "
                     f"{reused}{r['seconds']:.0f} ({r['estimate-seconds']:.0f}) |")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in PLOTS) + " (`metric-vs-round.png`: each federated run's "
              "own per-round validation from its `metrics.json`; `learning-curve.png`: Table 5).", ""]
    return "\n".join(lines)


def write_outputs(doc: Mapping[str, Any], out: Path) -> list[str]:
    """Write results.json/.csv/.md and the plots (each atomically); returns the plots' names."""
    write_bytes_atomic(out / "results.json", json.dumps(doc, indent=2, default=str).encode())
    write_bytes_atomic(out / "results.csv", csv_bytes(csv_header(), results_rows(doc), compress=False))
    write_bytes_atomic(out / "per-silo.csv", csv_bytes(SILO_CSV_HEADER, silo_rows(doc), compress=False))
    write_bytes_atomic(out / "learning-curve.csv", csv_bytes(CURVE_CSV_HEADER, curve_rows(doc), compress=False))
    write_bytes_atomic(out / "results.md", results_markdown(doc).encode())
    pngs = plots(doc)
    for name, data in pngs.items():
        write_bytes_atomic(out / name, data)
    return list(pngs)


def method_lines(doc: Mapping[str, Any]) -> list[str]:
    """One Markdown bullet per method family in ``doc``, with the run's numbers."""
    t = doc.get("training", {})
    rounds = t.get("num-server-rounds")
    history = (f"windows of the newest {t.get('max-history')} events" if t.get("user-tower") == "sequence"
               else f"{t.get('max-seq-len')} tokens")
    budget = (f"{rounds} round{'' if rounds == 1 else 's'} × {t.get('local-steps')} local steps × batch "
              f"{t.get('batch-size')} per silo, {history}")
    by_family: dict[str, list[str]] = {}
    for name, entry in doc["methods"].items():
        by_family.setdefault(entry["family"], []).append(name)

    def eps(family: str) -> str:
        return ", ".join(f"{doc['methods'][n]['epsilon']:g}" for n in by_family[family])

    text = {
        "baseline": lambda: (f"baselines ({', '.join(f'`{n}`' for n in by_family['baseline'])}): fitted on the train "
                             "split of every silo, centrally (not private). `history-logit` is the next-interest "
                             "head's own conditional logit over the history features, fitted without noise to "
                             "convergence: the ceiling of that head."),
        "federated-dp": lambda: (f"`federated-dp-eps*` (ε ∈ {{{eps('federated-dp')}}}): a federated simulation "
                                 f"(`fedshift simulate`) on every silo, {budget}; the last round's checkpoint."),
        "federated-nonprivate": lambda: f"`federated-nonprivate`: the same without DP, {budget}.",
        "local-only": lambda: (f"`local-only-eps*` (ε = {eps('local-only')}): one simulation per silo on a dataset "
                               "view holding only that silo, same config; every held-out user is scored by the model "
                               "of their own silo, platform rows pool the silos' users, 'overall' pools every "
                               "platform."),
        "centralised": lambda: ("`centralised-nonprivate`: the converged ceiling "
                                "(`simulations/experiment/ceiling.py`): all silos' training users pooled, no DP, exact "
                                "popularity and transitions, epochs until validation NDCG@10 stops rising, for each "
                                "head learning rate of a small grid; the best validation epoch."
                                if t.get("user-tower") == "sequence" else
                                "`centralised-nonprivate`: all silos' training users pooled, no DP "
                                "(`simulations/experiment/centralised.py`), the same number of gradient steps as all "
                                "silos of a federated run together."),
        "lopo": lambda: (f"`lopo-A-to-B-eps*` (ε = {eps('lopo').split(',')[0]}): federated DP on A's silos only, "
                         "evaluated on B's held-out users (zero-shot transfer through the text encoder)."),
    }
    return [f"- {text[f]()}" for f in by_family if f in text]


def silo_table(doc: Mapping[str, Any]) -> list[str]:
    """Table 4: federated DP vs local-only DP on each silo's held-out users (empty without both)."""
    ps = doc.get("per-silo") or {}
    if not ps.get("silos"):
        return []
    fed, loc = ps["federated"], ps["local-only"]
    regions = doc.get("regions")
    setting = (f"the unequal setting: each platform's users re-partitioned by a hash of the user id into a large "
               f"region and a small one holding ≈{regions['share']:g} of them (docs/experiment.md)"
               if regions else "the dataset's own silos")
    lines = ["", f"**Table 4.** Does federation help each silo? `{fed}` against `{loc}` (the same ε per silo) on "
             f"each silo's held-out {ps['split']} users, {setting}. Each cell: value [95 % paired-bootstrap "
             "interval]; Δ = federated − local-only per user, with its paired interval: federation helps a silo "
             "only where the interval of Δ lies above 0."
             + (" The last row pools the silos with fewer than half the median silo's training users: their held-out "
                "users together, the same draws for both methods." if ps.get("pooled") else "")
             + (" A region silo's row (platforms joined with +) pools its cases on every platform: a held-out user "
                "counts once per platform of their held-out events." if any("+" in r["platform"] for r in
                                                                         ps["silos"].values()) else ""), "",
             "| silo | platform | train users | held-out users | federated NDCG@10 | local-only NDCG@10 | "
             "Δ NDCG@10 | Δ HR@10 |", "|---|---|---|---|---|---|---|---|"]
    pooled = {f"{k} silos pooled ({' + '.join(f'`{x}`' for x in r['silos'])})": r
              for k, r in (ps.get("pooled") or {}).items()}
    for s, r in {**{f"`{k}`": v for k, v in ps["silos"].items()}, **pooled}.items():
        lines.append("| " + " | ".join([s, r["platform"], str(r.get("train-users") or "–"), str(r["users"]),
                                         _cell(r["federated"].get("ndcg10")), _cell(r["local-only"].get("ndcg10")),
                                         _cell(r["delta"].get("ndcg10"), signed=True),
                                         _cell(r["delta"].get("hr10"), signed=True)]) + " |")
    return lines


def curve_table(doc: Mapping[str, Any]) -> list[str]:
    """Table 5: the learning curves (validation NDCG@10 per cumulative DP step)."""
    lc = doc.get("learning-curves") or {}
    methods = lc.get("methods") or {}
    if not methods:
        return []
    rounds = sorted({p["round"] for pts in methods.values() for p in pts})
    steps = lc.get("steps-per-round")
    users = ", ".join(f"{p}: {n}" for p, n in lc.get("users", {}).items())
    lines = ["", f"**Table 5.** Learning curves: NDCG@10 [95 % bootstrap interval] on a seeded subset of "
             f"**validation** users ({users}; the same users for every method and round) after each round's "
             f"checkpoint, against cumulative DP-SGD steps per silo (round × {steps} local steps; for the "
             "non-private run, plain steps). Round 0 is the untrained model. Local-only: each silo's checkpoint "
             "scores its own silo's users (user-weighted over silos). Plot: `learning-curve.png`.", "",
             "| round | steps per silo | " + " | ".join(f"`{m}`" for m in methods) + " |",
             "|" + "---|" * (2 + len(methods))]
    for r in rounds:
        cells = []
        for pts in methods.values():
            pt = next((p for p in pts if p["round"] == r), None)
            cells.append(_cell(pt.get("ndcg10")) if pt else "–")
        lines.append(f"| {r} | {r * steps if steps else '–'} | " + " | ".join(cells) + " |")
    return lines


CURVE_CSV_HEADER = ["method", "round", "dp-steps", "users",
                    *(f"{m}{c}" for m in CURVE_METRICS for c in ("", "-ci95-low", "-ci95-high"))]


def curve_rows(doc: Mapping[str, Any]) -> list[list[Any]]:
    """CSV rows of the learning curves: one per method and round."""
    rows = []
    for name, pts in ((doc.get("learning-curves") or {}).get("methods") or {}).items():
        for p in pts:
            row: list[Any] = [name, p["round"], p["dp-steps"], p["users"]]
            for m in CURVE_METRICS:
                e = p.get(m) or {}
                lo, hi = e.get("ci95") or [None, None]
                row += [_num(e.get("value")), _num(lo), _num(hi)]
            rows.append(row)
    return rows
