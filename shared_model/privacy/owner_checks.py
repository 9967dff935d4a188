"""The data owner's checks of the ledger audit: each silo's own ledger against its policy,
against the server's gathered copy, and against what the server says happened.

Every failure names the file and line it found (paths relative to the audited folder):

* :func:`policy_failures`: every DP-SGD round record on a silo's ledger against that silo's
  ``policy.toml`` (δ ≤ ``max-delta``; the policy's accountant; ε budget and cumulative ε ≤
  ``max-epsilon-per-run``; lifetime ε, recomputed over every run on the ledger, ≤
  ``max-lifetime-epsilon``; σ > 0 unless ``allow-broken-noise-audit``), the recorded
  lifetime ε against its recomputation, and one (σ, q) per run (the noise is calibrated
  once per run: a record that differs was edited or the configuration changed mid-run).
* :func:`cross_check`: a silo's records of the run against the server's copy in the run's
  ``ledger.jsonl``, pair by pair: a record that differs, is missing or was added fails, and the
  server's ``silo-sha256`` must be the silo line's own ``sha256``.
* :func:`coverage_failures`: every silo-round that ``metrics.json`` records has its ledger
  record (a DP-SGD round when the silo trained, a refusal when it declined) with the same
  σ, q, steps, δ and ε, and a ``model-sha256`` equal to the ``update-sha256`` the server
  computed of the arrays it received (under secure aggregation the server records only
  ``masked-sha256``, of masked arrays, and that match is not possible); every ledger record has its metrics row; every
  checkpoint ``checkpoints/round-NNN`` names the run and a round in which some silo trained.

Unreadable inputs (``metrics.json``, a checkpoint's ``fedshift.json``) raise
:class:`AuditInputError`, one line naming the file; ``fedshift audit`` exits 2 on it.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from shared_model.privacy.ledger import LEDGER_NAME, Ledger, LedgerError
from shared_model.privacy.policy import POLICY_NAME, SiloPolicy, load_policy
from shared_model.privacy.records import (ENVELOPE, DpSgdRound, MetricRelease, PlainRelease, PopularityRelease, Record,
                                          TransitionRelease, parse_record)
from shared_model.privacy.recompute import OPACUS, opacus_epsilon

TOLERANCE = 1e-3
#: A ledger line: (line number, the raw dict as on disk, its typed record).
Line = tuple[int, dict[str, Any], Record]
#: metrics.json train-row key -> ledger field, for a silo-round that trained.
SAME_AS_METRICS = {"noise-multiplier": "noise_multiplier", "sample-rate": "sample_rate", "steps": "steps",
                   "delta": "delta", "epsilon": "epsilon_cumulative"}


#: Fields a cross-check shows first when a record differs.
FIRST_SHOWN = ("noise-multiplier", "sample-rate", "steps", "delta", "accountant", "run-id", "silo", "round")


class AuditInputError(ValueError):
    """An input the audit cannot read: one line, ``FILE: reason``."""


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or :class:`AuditInputError` naming it (truncated, garbled, unreadable)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise AuditInputError(f"{path}: cannot read the {what}: {exc.strerror or exc.__class__.__name__}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise AuditInputError(f"{path}: the {what} is not valid JSON{where}: truncated or garbled") from None


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` of a run folder, checked to hold its ``run`` object."""
    path = Path(run_dir) / "metrics.json"
    doc = read_json(path, "run's metrics")
    if not isinstance(doc, dict) or not isinstance(doc.get("run"), dict):
        raise AuditInputError(f"{path}: no \"run\" object (not a fedshift metrics.json)")
    if not isinstance(doc.get("records", []), list):
        raise AuditInputError(f"{path}: \"records\" is not a list")
    for i, row in enumerate(doc.get("records", [])):
        if not (isinstance(row, dict) and isinstance(row.get("round"), int) and isinstance(row.get("phase"), str)
                and isinstance(row.get("silo"), str)):
            raise AuditInputError(f"{path}: records[{i}]: expected an object with an integer round, a phase and a silo")
    return doc


def read_lines(path: Path) -> list[Line]:
    """Every record on the ledger at ``path`` with its line number; :class:`LedgerError` if bad."""
    return [(n, raw, parse_record(raw, path, n)) for n, raw in enumerate(Ledger(path).read(), start=1)]


def of_run(lines: list[Line], run_id: Any, silo: str | None = None) -> list[Line]:
    return [x for x in lines if str(getattr(x[2], "run_id", None)) == str(run_id)
            and (silo is None or getattr(x[2], "silo", None) == silo)]


# ----------------------------------------------------------------------------- policy
def policy_failures(policy: SiloPolicy | None, lines: list[Line], name: str, run_id: Any = None) -> list[str]:
    """Failures of the DP-SGD records on one silo's ledger (``lines``, all of it, in order;
    only those of ``run_id`` are judged when given) against ``policy`` (None: only one (σ, q)
    per run and the recorded lifetime ε); ``name`` is the ledger's file as reported."""
    out: list[str] = []
    history: list[tuple[float, float, int]] = []  # every DP round before, every run (the lifetime)
    first_of_run: dict[str, tuple[int, DpSgdRound]] = {}
    for n, _, rec in lines:
        if isinstance(rec, (MetricRelease, PopularityRelease, TransitionRelease)):  # spends ε: lifetime, run's cap
            history.append(rec.mechanism)
            if policy is not None and (run_id is None or str(rec.run_id) == str(run_id)) \
                    and rec.epsilon_cumulative > policy.max_epsilon_per_run + 1e-6:
                out.append(f"{name}:{n}: {rec.KIND} of round {rec.round} of run {rec.run_id}: epsilon-cumulative "
                           f"{rec.epsilon_cumulative:.4g} > max-epsilon-per-run {policy.max_epsilon_per_run:g}")
            continue
        if not isinstance(rec, DpSgdRound):
            continue
        history.append(rec.mechanism)
        if run_id is not None and str(rec.run_id) != str(run_id):
            continue
        at = f"{name}:{n}: round {rec.round} of run {rec.run_id}"
        run, first = str(rec.run_id), first_of_run.setdefault(str(rec.run_id), (n, rec))
        if (rec.noise_multiplier, rec.sample_rate) != (first[1].noise_multiplier, first[1].sample_rate):
            out.append(f"{at}: σ={rec.noise_multiplier:.6g}, q={rec.sample_rate:.6g} but line {first[0]} of run "
                       f"{run} has σ={first[1].noise_multiplier:.6g}, q={first[1].sample_rate:.6g} (the noise is "
                       "calibrated once per run)")
        lifetime = opacus_epsilon(rec.accountant, history, rec.delta) if rec.accountant in OPACUS else None
        if lifetime is not None and rec.epsilon_lifetime is not None and abs(rec.epsilon_lifetime - lifetime) > TOLERANCE:
            out.append(f"{at}: epsilon-lifetime {rec.epsilon_lifetime:.4f} but every release on the ledger up "
                       f"to it recomputes to {lifetime:.4f} ({rec.accountant}, δ={rec.delta:g})")
        if policy is None:
            continue
        if rec.delta > policy.max_delta:
            out.append(f"{at}: δ={rec.delta:g} > max-delta {policy.max_delta:g} of the policy")
        if rec.accountant != policy.accountant:
            out.append(f"{at}: accountant {rec.accountant}, the policy enforces {policy.accountant}")
        for field, value in (("epsilon-budget", rec.epsilon_budget), ("epsilon-cumulative", rec.epsilon_cumulative)):
            if value > policy.max_epsilon_per_run + 1e-6:
                out.append(f"{at}: {field} {value:.4g} > max-epsilon-per-run {policy.max_epsilon_per_run:g}")
        if rec.noise_multiplier <= 0 and not policy.allow_broken_noise_audit:
            out.append(f"{at}: σ={rec.noise_multiplier:g} (no noise) and the policy has allow-broken-noise-audit = false")
        if lifetime is not None and policy.max_lifetime_epsilon > 0 and lifetime > policy.max_lifetime_epsilon + 1e-6:
            out.append(f"{at}: lifetime ε {lifetime:.4f} > max-lifetime-epsilon {policy.max_lifetime_epsilon:g}")
    return out


def request_failures(policy: SiloPolicy, config: dict[str, Any], where: str) -> list[str]:
    """The run's config asked for what the silo's policy forbids, and the silo trained
    (``where``: its metrics.json train row, ``metrics.json:LINE: round R silo S``)."""
    out = []
    if config.get("dp") is False and not policy.allow_non_private:
        out.append(f"{where}: trained without DP (dp=false) and its policy has allow-non-private = false")
    if config.get("audit-broken-noise") is True and not policy.allow_broken_noise_audit:
        out.append(f"{where}: trained with audit-broken-noise (σ=0) and its policy has allow-broken-noise-audit = false")
    return out


# ------------------------------------------------------------------------ cross-check
def _key(rec: Record) -> tuple[str, int]:
    return rec.KIND, int(getattr(rec, "round", -1))


def _fields(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k not in ENVELOPE}


def cross_check(server: list[Line], silo: list[Line], server_name: str, silo_name: str) -> list[str]:
    """Failures of one silo's records of a run (``silo``) against the server's copy
    (``server``: that silo's records of the run on the federation ledger)."""
    out: list[str] = []
    theirs: dict[tuple[str, int], list[Line]] = defaultdict(list)
    for x in server:
        theirs[_key(x[2])].append(x)
    for n, raw, rec in silo:
        kind, rnd = _key(rec)
        pairs = theirs.get((kind, rnd))
        if not pairs:
            out.append(f"{silo_name}:{n}: {kind} round {rnd} is missing from {server_name}")
            continue
        sn, sraw, _ = pairs.pop(0)
        mine, copy = _fields(raw), _fields(sraw)
        diff = sorted((k for k in set(mine) | set(copy) if mine.get(k) != copy.get(k)),
                      key=lambda k: (k not in FIRST_SHOWN, k))  # the mechanism first
        if diff:
            shown = "; ".join(f"{k} {copy.get(k)!r} vs {mine.get(k)!r}" for k in diff[:3])
            out.append(f"{server_name}:{sn} differs from {silo_name}:{n} ({kind} round {rnd}): {shown} (server vs silo)")
        elif sraw.get("silo-sha256") != raw.get("sha256"):
            out.append(f"{server_name}:{sn}: silo-sha256 is not the sha256 of {silo_name}:{n} ({kind} round {rnd}): "
                       "the silo's line was rewritten after it was sent")
    for rest in theirs.values():
        for sn, _, rec in rest:
            out.append(f"{server_name}:{sn}: {rec.KIND} round {_key(rec)[1]} is not on {silo_name} (added)")
    return out


# --------------------------------------------------------------------------- coverage
def metrics_line(text: str, server_round: int, phase: str, silo: str) -> int:
    """Line of a ``records`` row of metrics.json (1 when it cannot be located)."""
    start = text.find('"records"')
    m = re.compile(r'\{\s*("round":\s*%d,\s*"phase":\s*"%s",\s*"silo":\s*%s)' % (
        server_round, re.escape(phase), re.escape(json.dumps(silo)))).search(text, max(start, 0))
    pos = m.start(1) if m else max(start, 0)
    return text.count("\n", 0, pos) + 1


def trained(row: dict[str, Any]) -> bool:
    """A metrics.json train row of a silo that touched its data (not refused, not out of budget)."""
    return not row.get("refused") and not row.get("budget-exhausted")


def coverage_failures(run_dir: Path, doc: dict[str, Any], lines: list[Line]) -> list[str]:
    """metrics.json and checkpoints against the run's ``lines`` on the server's ledger."""
    run_dir = Path(run_dir)
    run_id, dp = doc["run"].get("run-id"), doc["run"].get("dp", True)
    text = (run_dir / "metrics.json").read_text(encoding="utf-8")
    rows = [r for r in doc.get("records", []) if isinstance(r, dict) and r.get("phase") == "train"]
    out: list[str] = []
    by_key: dict[tuple[str, str, int], list[Line]] = defaultdict(list)
    for x in lines:
        by_key[(x[2].KIND, str(getattr(x[2], "silo", "")), int(getattr(x[2], "round", -1)))].append(x)
    seen: set[int] = set()
    for row in rows:
        silo, rnd = str(row.get("silo")), int(row.get("round", -1))
        at = f"metrics.json:{metrics_line(text, rnd, 'train', silo)}: round {rnd} silo {silo}"
        kind = DpSgdRound.KIND if trained(row) else "refusal"
        if dp is False and kind == DpSgdRound.KIND:
            continue  # a non-private run writes no DP records (the policy check judges it)
        found = [x for x in by_key.get((kind, silo, rnd), []) if x[0] not in seen]
        if not found:
            out.append(f"{at}: {'trained' if kind == DpSgdRound.KIND else 'declined'} but ledger.jsonl has no "
                       f"{kind} record of it (run {run_id})")
            continue
        n, raw, rec = found[0]
        seen.add(n)
        if not isinstance(rec, DpSgdRound):
            continue
        for key, field in SAME_AS_METRICS.items():
            mine, theirs = row.get(key), getattr(rec, field)
            if isinstance(mine, (int, float)) and not math.isclose(float(mine), float(theirs), rel_tol=1e-9, abs_tol=1e-12):
                out.append(f"{at}: {key} {mine!r} but ledger.jsonl:{n} records {theirs!r}")
        if "update-sha256" in row and row["update-sha256"] != rec.model_sha256:
            out.append(f"{at}: the server received arrays with sha256 {str(row['update-sha256'])[:12]}… but "
                       f"ledger.jsonl:{n} records model-sha256 {str(rec.model_sha256)[:12]}…")
    replies = {(str(r.get("silo")), int(r.get("round", -1)), str(r.get("phase"))) for r in doc.get("records", [])
               if isinstance(r, dict)}
    for n, _, rec in lines:
        if n not in seen and _interrupted(rec, doc["run"].get("resumed") or []):
            continue  # spent and counted in ε; its round ran again after the resume
        if isinstance(rec, (MetricRelease, PlainRelease, PopularityRelease, TransitionRelease)):  # needs its reply
            if (str(rec.silo), int(rec.round), str(rec.phase)) not in replies:
                out.append(f"ledger.jsonl:{n}: {rec.KIND} round {rec.round} of silo {rec.silo} has no {rec.phase} "
                           "row in metrics.json (added)")
            continue
        if n not in seen:
            out.append(f"ledger.jsonl:{n}: {rec.KIND} round {getattr(rec, 'round', '?')} of silo "
                       f"{getattr(rec, 'silo', '?')} has no train row in metrics.json (added)")
    rounds = {int(r.get("round", -1)) for r in rows if trained(r)}
    for meta_path in sorted((run_dir / "checkpoints").glob("round-*/fedshift.json")):
        meta = read_json(meta_path, "checkpoint metadata")
        rel = f"{meta_path.relative_to(run_dir)}:{_key_line(meta_path, 'run-id')}"
        rnd = meta.get("round") if isinstance(meta, dict) else None
        if not isinstance(rnd, int):
            raise AuditInputError(f"{meta_path}: no integer \"round\" (not a fedshift checkpoint)")
        if str(meta.get("run-id")) != str(run_id):
            out.append(f"{rel}: checkpoint of run {meta.get('run-id')}, metrics.json names run {run_id}")
        if rnd > 0 and rnd not in rounds:
            out.append(f"{rel}: round {rnd} was aggregated but metrics.json has no silo that trained in it")
    return out


def _interrupted(rec: Record, resumes: list[dict[str, Any]]) -> bool:
    """``rec`` belongs to a round that an interruption cut off before its checkpoint: a later
    resume restarted after an earlier round (``from-round``), and ``rec`` was written by an
    incarnation of the run before that resume (``resumed-in``: none, or an earlier resume's
    Flower run). The server dropped that round's rows; the silo's ε still counts the record."""
    made_by = [None] + [str(r.get("run-id")) for r in resumes]
    by = getattr(rec, "resumed_in", None)
    by = None if by is None else str(by)
    return any(int(getattr(rec, "round", -1)) > int(r.get("from-round", 1 << 30)) and by in made_by[: i + 1]
               for i, r in enumerate(resumes))


def _key_line(path: Path, key: str) -> int:
    """Line of ``"key":`` in a JSON file (1 when absent)."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if f'"{key}":' in line:
            return n
    return 1


# ------------------------------------------------------------------------- the checks
Check = tuple[str, bool, str]


def summary(failures: list[str], ok: str, shown: int = 4) -> str:
    """A check's detail: ``ok`` when nothing failed, else the first failures (and how many more)."""
    if not failures:
        return ok
    more = f"; … and {len(failures) - shown} more" if len(failures) > shown else ""
    return "; ".join(failures[:shown]) + more


def run_folder_checks(run_dir: Path, doc: dict[str, Any], server: list[Line]) -> list[Check]:
    """Every data-owner check of a run folder (``server``: every line of its ledger.jsonl)."""
    run_dir = Path(run_dir)
    info = doc["run"]
    run_id, dp, config = info.get("run-id"), info.get("dp", True), info.get("config") or {}
    mine = of_run(server, run_id)
    others = sorted({str(getattr(x[2], "run_id", "?")) for x in server} - {str(run_id)})
    checks: list[Check] = []
    elsewhere = f"; {len(server) - len(mine)} record(s) of other runs ({', '.join(others)}) not audited" if others else ""
    if dp is not False:
        checks.append(("run-records", bool(mine), f"{len(mine)} records of run {run_id} (metrics.json) on ledger.jsonl"
                       f"{elsewhere}" if mine else f"ledger.jsonl: no record of run {run_id}, the run metrics.json "
                       f"names, in a DP run{elsewhere}: nothing to audit is a failure"))
    rows = [r for r in doc.get("records", []) if isinstance(r, dict) and r.get("phase") == "train"]
    ckpts = len(list((run_dir / "checkpoints").glob("round-*/fedshift.json")))
    cov = coverage_failures(run_dir, doc, mine)
    masked = any("masked-sha256" in r for r in rows)  # secure aggregation: the server never saw a clear update
    same = ("σ, q, steps, δ, ε agree; secure aggregation: the server received masked arrays only, so model-sha256 "
            "stays the silo's own" if masked else "σ, q, steps, δ, ε and model-sha256 = the update the server received agree")
    checks.append(("rounds-on-ledger", not cov, summary(cov, (
        f"each of the {len(rows)} silo-rounds of metrics.json has its ledger record ({same}) and each of the "
        f"{ckpts} checkpoints names run {run_id}"))))
    text = (run_dir / "metrics.json").read_text(encoding="utf-8")
    state = run_dir / "silo-state"
    folders = sorted(p for p in state.iterdir() if (p / LEDGER_NAME).is_file() or (p / POLICY_NAME).is_file()) \
        if state.is_dir() else []
    for folder in folders:
        name = f"silo-state/{folder.name}/{LEDGER_NAME}"
        try:
            lines = read_lines(folder / LEDGER_NAME)
        except LedgerError as exc:
            checks.append((f"silo-ledger:{folder.name}", False, f"silo-state/{folder.name}/{exc}"))
            continue
        policy = load_policy(folder / POLICY_NAME) if (folder / POLICY_NAME).is_file() else None
        run_lines = of_run(lines, run_id)
        fails = cross_check(of_run(mine, run_id, folder.name), run_lines, "ledger.jsonl", name)
        fails += policy_failures(policy, lines, name, run_id)
        if policy is not None:
            for row in rows:
                if str(row.get("silo")) == folder.name and trained(row):
                    rnd = int(row.get("round", -1))
                    fails += request_failures(policy, config, f"metrics.json:{metrics_line(text, rnd, 'train', folder.name)}: "
                                              f"round {rnd} silo {folder.name}")
        checks.append((f"silo-ledger:{folder.name}", not fails, summary(fails, (
            f"hash chain verified; its {len(run_lines)} records of run {run_id} equal ledger.jsonl's copies; "
            + (f"every record within {POLICY_NAME}" if policy else f"no {POLICY_NAME} here: policy not checked")))))
    if folders:
        have = {f.name for f in folders}
        absent = sorted({str(getattr(x[2], "silo", "")) for x in mine} - have)
        checks.append(("silo-ledgers", not absent, f"ledger.jsonl has records of silo(s) {', '.join(absent)} whose "
                       f"silo-state/<silo>/{LEDGER_NAME} is absent" if absent else
                       f"{len(folders)} silo ledger(s) found under silo-state/ and cross-checked"))
    return checks


def silo_folder_checks(folder: Path, lines: list[Line]) -> list[Check]:
    """The checks of a silo's own state folder beyond recomputation: its policy (when the
    folder holds one) over every record, one (σ, q) per run, the recorded lifetime ε."""
    folder = Path(folder)
    policy = load_policy(folder / POLICY_NAME) if (folder / POLICY_NAME).is_file() else None
    fails = policy_failures(policy, lines, LEDGER_NAME)
    rounds = sum(isinstance(x[2], DpSgdRound) for x in lines)
    ok = (f"each of the {rounds} DP-SGD records: one (σ, q) per run, lifetime ε recomputed, "
          + (f"within {POLICY_NAME} ({policy.describe()})" if policy else f"no {POLICY_NAME} here: policy not checked"))
    return [("silo-policy" if policy else "silo-records", not fails, summary(fails, ok))]
