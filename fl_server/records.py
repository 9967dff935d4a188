"""What the server records of a run: every client metric per round and silo, written as
``metrics.json`` and ``metrics.csv`` (atomically), and the per-round table it prints.

``metrics.json`` also holds ``problems`` (every failed reply and refused update, naming
the silo and the reason) and ``outcomes`` (per round and phase: replies that succeeded,
failed, or were refused by the silo's own policy); :mod:`shared_model.run_health` reads
them to decide a CLI's exit status.

Each silo says how its metrics left (``release-metrics``: ``dp`` noisy, inside ε; ``plain``
unnoised, OUTSIDE ε; ``none`` not sent); ``metrics.json`` ``metric-releases`` lists it per
silo with the numbers outside ε, and the table marks every row and explains the marks."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from shared_model.io_utils import write_bytes_atomic
from shared_model.privacy.metric_release import PUBLIC

#: Table mark per ``release-metrics`` mode.
MARKS = {"dp": "dp", "plain": "PLAIN", "none": "none"}


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` via a temp file + fsync + rename (never half-written)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class RunRecords:
    """Append-only list of per-silo records, one per (round, phase, silo)."""

    def __init__(self, out_dir: Path, run_info: dict[str, Any]):
        self.out_dir = out_dir
        self.run_info = dict(run_info)
        self.records: list[dict[str, Any]] = []
        self.problems: list[dict[str, Any]] = []
        self.outcomes: list[dict[str, Any]] = []

    @classmethod
    def resumed(cls, out_dir: Path, doc: dict[str, Any], resume: dict[str, Any]) -> "RunRecords":
        """The records of an interrupted run (its ``metrics.json`` document), to be extended;
        ``resume`` (the resuming Flower run id, the round it starts after) is appended to
        ``run.resumed``. Records of rounds after that round (an interrupted round that left
        no checkpoint) are dropped: that round runs again."""
        after = int(resume["from-round"])
        run_info = {k: v for k, v in doc["run"].items() if k not in {"finished", "wall-seconds", "ended-early"}}
        run_info["resumed"] = [*run_info.get("resumed", []), resume]
        for key in ("missing", "refusals"):
            if key in run_info:
                run_info[key] = [m for m in run_info[key] if m["round"] <= after]
        records = cls(out_dir, run_info)
        records.records = [r for r in doc.get("records", []) if r["round"] <= after]
        records.problems = [r for r in doc.get("problems", []) if r["round"] <= after]
        records.outcomes = [r for r in doc.get("outcomes", []) if r["round"] <= after]
        return records

    def problem(self, server_round: int, phase: str, silo: str, node_id: int, kind: str, reason: str) -> None:
        """A reply that failed or an update the server refused (``kind``: error, failed, refused, capped)."""
        self.problems.append({"round": server_round, "phase": phase, "silo": silo, "node-id": node_id,
                              "kind": kind, "reason": reason})

    def outcome(self, server_round: int, phase: str, ok: int, failed: int, declined: int = 0) -> None:
        """How a round's replies went: ``ok`` used, ``failed`` (error, non-finite, refused by the
        server), ``declined`` (the silo's own policy, e.g. an exhausted privacy budget)."""
        self.outcomes = [o for o in self.outcomes if (o["round"], o["phase"]) != (server_round, phase)]
        self.outcomes.append({"round": server_round, "phase": phase, "ok": ok, "failed": failed,
                              "declined": declined})

    def add(self, server_round: int, phase: str, silo: str, node_id: int, metrics: dict[str, Any]) -> None:
        self.records.append({"round": server_round, "phase": phase, "silo": silo, "node-id": node_id, **metrics})

    def rows(self, server_round: int, phase: str) -> list[dict[str, Any]]:
        return sorted(
            (r for r in self.records if r["round"] == server_round and r["phase"] == phase),
            key=lambda r: r["silo"],
        )

    def by_round(self) -> list[dict[str, Any]]:
        out = []
        for rnd in sorted({r["round"] for r in self.records}):
            silos: dict[str, dict[str, Any]] = {}
            for r in self.records:
                if r["round"] != rnd:
                    continue
                entry = {k: v for k, v in r.items() if k not in {"round", "phase", "silo"}}
                silos.setdefault(r["silo"], {})[r["phase"]] = entry
            out.append({"round": rnd, "silos": dict(sorted(silos.items()))})
        return out

    def metric_releases(self) -> dict[str, dict[str, Any]]:
        """Per silo: its ``release-metrics`` mode(s) and the numbers it sent outside ε (plain)."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.records:
            mode = r.get("release-metrics")
            if not mode:
                continue
            entry = out.setdefault(r["silo"], {"release-metrics": [], "outside-epsilon": []})
            if mode not in entry["release-metrics"]:
                entry["release-metrics"].append(mode)
            if mode == "plain":
                private = [k for k in r if k not in PUBLIC and k not in {"round", "phase", "silo", "node-id", "device",
                                                                      "release-metrics", "tensor-bytes", "payload-bytes"}]
                entry["outside-epsilon"] += [k for k in private if k not in entry["outside-epsilon"]]
        return out

    def write(self) -> None:
        doc = {"run": self.run_info, "rounds": self.by_round(), "records": self.records,
               "problems": self.problems, "outcomes": self.outcomes, "metric-releases": self.metric_releases()}
        atomic_write_text(self.out_dir / "metrics.json", json.dumps(_json_safe(doc), indent=2, sort_keys=False))
        columns: list[str] = []
        for r in self.records:
            columns.extend(k for k in r if k not in columns)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in self.records:
            writer.writerow({k: r.get(k, "") for k in columns})
        atomic_write_text(self.out_dir / "metrics.csv", buf.getvalue())

    def table(self, server_round: int) -> str:
        """Per-silo table of one round: loss and ε from training, accuracy and NDCG@10 from evaluation."""
        train = {r["silo"]: r for r in self.rows(server_round, "train")}
        evals = {r["silo"]: r for r in self.rows(server_round, "evaluate")}
        delta = next((r["delta"] for r in train.values() if r.get("delta") is not None), self.run_info.get("delta"))
        head = f"{'silo':<14}{'loss':>9}{'ε':>9}{'ε budget':>10}{'cat acc':>9}{'NDCG@10':>9}{'HR@10':>8}  metrics"
        lines = [
            f"round {server_round} — ε is cumulative, δ={_fmt_delta(delta)}, accountant {self.run_info.get('accountant-label', '?')}",
            head,
            "-" * len(head),
        ]
        for silo in sorted(set(train) | set(evals)):
            t, e = train.get(silo, {}), evals.get(silo, {})
            mode = e.get("release-metrics") or t.get("release-metrics")
            lines.append(
                f"{silo:<14}{_fmt(t.get('train-loss')):>9}{_fmt(t.get('epsilon')):>9}{_fmt(t.get('epsilon-budget')):>10}"
                f"{_fmt(e.get('category-accuracy')):>9}{_fmt(e.get('ndcg10'), 4):>9}{_fmt(e.get('hr10')):>8}"
                + f"  {MARKS.get(mode, '') if mode else ('(mean)' if silo == 'ALL' else '')}"
                + ("  budget exhausted" if t.get("budget-exhausted") else "")
                + ("  refused (its privacy policy)" if t.get("refused") else "")
            )
        return "\n".join(lines + _legend(train, evals))


def _legend(train: dict[str, dict[str, Any]], evals: dict[str, dict[str, Any]]) -> list[str]:
    """One line per ``release-metrics`` mode present: what the marks mean, naming the silos."""
    by_mode: dict[str, list[str]] = {}
    for silo in sorted(set(train) | set(evals)):
        mode = evals.get(silo, {}).get("release-metrics") or train.get(silo, {}).get("release-metrics")
        if mode:
            by_mode.setdefault(str(mode), []).append(silo)
    text = {
        "dp": "dp: cat acc, NDCG@10, HR@10 are NOISY releases (Gaussian mechanism, inside the silo's ε); "
              "loss withheld",
        "plain": "PLAIN: loss, cat acc, NDCG@10, HR@10 left the silo UNNOISED — OUTSIDE ε",
        "none": "none: the silo sent no metrics (only what training needs)",
    }
    return [f"{text.get(m, m)} [{', '.join(silos)}]" for m, silos in sorted(by_mode.items())]


def _fmt_delta(delta: Any) -> str:
    return f"{delta:g}" if isinstance(delta, (int, float)) else "n/a (no DP round reported)"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "∞"
    return f"{float(value):.{digits}f}"
