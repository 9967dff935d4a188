"""The ledger audit: run every check on a folder holding a ``ledger.jsonl``; write
``audit.md`` and ``audit-epsilon.png`` there.

The folder is a run's results folder (the server's federation ledger; its
``metrics.json`` names the run, whose records alone are audited) or a silo's state
folder ``<state-dir>/<silo>`` (its own ledger, every run on it). ε is recomputed by
:mod:`shared_model.privacy.recompute` from the spending records (DP-SGD rounds and Gaussian
metric, popularity and transition releases, one heterogeneous composition per silo; each
release kind's ε alone and share of ε: :func:`by_kind`); refusals spend nothing and are
listed (the policy or budget rule, what was asked); ``plain-release`` declarations are listed
as numbers outside ε, and every metric ``metrics.json`` shows must have its ledger record
(:func:`release_checks`). The person-facing page and plot are :mod:`shared_model.privacy.audit_page`.

Each silo's privacy policy is shown (:func:`silo_policies`): a silo folder's own
``policy.toml``, or for a run folder every ``silo-state/<silo>/policy.toml`` (where
``fedshift simulate`` keeps the simulated silos' side), with the refusals on that silo's own
ledger. A policy that cannot be read raises :class:`~shared_model.privacy.policy.PolicyError`
(bad input: ``fedshift audit`` exits 2 with its one line).

The data owner's checks (each silo's own ledger against the server's copy and its policy,
every silo-round of ``metrics.json`` and every checkpoint on the ledger) are
:mod:`shared_model.privacy.owner_checks`; an unreadable ``metrics.json`` raises its
:class:`~shared_model.privacy.owner_checks.AuditInputError` (exit 2 too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared_model.io_utils import write_bytes_atomic
from shared_model.privacy import audit_page
from shared_model.privacy.ledger import LEDGER_NAME, Ledger, LedgerError
from shared_model.privacy.policy import POLICY_NAME, load_policy
from shared_model.privacy.owner_checks import read_lines, read_metrics, run_folder_checks, silo_folder_checks
from shared_model.privacy.records import (DpSgdRound, MetricRelease, PlainRelease, PopularityRelease, Record, Spending,
                                          TransitionRelease, history_of, of_run, read_records, refusals, spending)
from shared_model.privacy.recompute import label as accountant_label
from shared_model.privacy.recompute import opacus_epsilon, opacus_rdp, recompute

TOLERANCE = 1e-3


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "passed": bool(ok), "detail": detail}


def silo_policies(run_dir: Path, run_id: Any = None) -> dict[str, dict[str, Any]]:
    """Each silo's policy (dashed keys, file, sha256) and the refusals on its own ledger
    (of ``run_id`` when given), for a silo folder or a run folder's ``silo-state/*``."""
    run_dir = Path(run_dir)
    folders = [run_dir] if (run_dir / POLICY_NAME).is_file() else sorted(
        p.parent for p in (run_dir / "silo-state").glob(f"*/{POLICY_NAME}"))
    out: dict[str, dict[str, Any]] = {}
    for folder in folders:
        policy = load_policy(folder / POLICY_NAME)
        try:
            own = refusals(read_records(Ledger(folder / LEDGER_NAME)))
        except LedgerError as exc:
            own, error = [], str(exc)
        else:
            error = ""
        if run_id is not None:
            own = of_run(own, run_id)
        out[folder.name] = {"file": str(folder / POLICY_NAME), "policy": policy.to_dict(), "sha256": policy.sha256,
                            "describe": policy.describe(), "refusals-on-own-ledger": len(own),
                            "rules": sorted({r.rule for r in own}), **({"ledger-error": error} if error else {})}
    return out


def by_kind(recs: list[Spending], delta: float, accountant: str) -> dict[str, Any]:
    """ε of each release kind alone, and each release kind's share of the silo's ε: its
    marginal cost ε(all) − ε(all but that kind) over ε(all) (composition is not additive)."""
    def of(kind: type) -> list[tuple[float, float, int]]:
        return history_of([r for r in recs if isinstance(r, kind)])

    sgd, metric, popularity, transition = of(DpSgdRound), of(MetricRelease), of(PopularityRelease), \
        of(TransitionRelease)
    joint = opacus_epsilon(accountant, sgd + metric + popularity + transition, delta)

    def share(without: list[tuple[float, float, int]]) -> float:
        return (joint - opacus_epsilon(accountant, without, delta)) / joint if joint > 0 else 0.0

    return {"epsilon-dp-sgd-alone": opacus_epsilon(accountant, sgd, delta),
            "epsilon-metric-releases-alone": opacus_epsilon(accountant, metric, delta),
            "metric-releases": sum(int(n) for _, _, n in metric),
            "metric-share-of-epsilon": share(sgd + popularity + transition),
            "epsilon-popularity-release-alone": opacus_epsilon(accountant, popularity, delta),
            "popularity-releases": len(popularity),
            "popularity-share-of-epsilon": share(sgd + metric + transition),
            "epsilon-transition-release-alone": opacus_epsilon(accountant, transition, delta),
            "transition-releases": len(transition),
            "transition-share-of-epsilon": share(sgd + metric + popularity)}


def release_checks(doc: dict[str, Any] | None, records: list[Record]) -> list[dict[str, Any]]:
    """Every metric a silo sent (metrics.json) has its ledger record: a ``metric-release`` for
    a ``dp`` evaluation, a ``plain-release`` for a ``plain`` reply. A silo that sent metrics
    without its record fails, named by metrics.json, round and silo."""
    sent = (doc or {}).get("records", [])  # doc: metrics.json as read_metrics parsed it (None: a silo folder)
    dp = {(r.silo, r.round) for r in records if isinstance(r, MetricRelease)}
    plain = {(r.silo, r.round, r.phase) for r in records if isinstance(r, PlainRelease)}
    missing: list[str] = []
    modes: dict[str, int] = {}
    for rec in sent if isinstance(sent, list) else []:
        mode, silo, rnd, phase = rec.get("release-metrics"), rec.get("silo"), rec.get("round"), rec.get("phase")
        if not mode or not isinstance(rnd, int):
            continue
        modes[mode] = modes.get(mode, 0) + 1
        if mode == "dp" and phase == "evaluate" and rec.get("num-examples") and not rec.get("metrics-withheld") \
                and (silo, rnd) not in dp:
            missing.append(f"{silo} round {rnd} evaluate: dp metrics sent, no metric-release record")
        trained = phase == "train" and "train-loss" in rec and not rec.get("budget-exhausted") and not rec.get("refused")
        if mode == "plain" and (phase == "evaluate" or trained) and (silo, rnd, phase) not in plain:
            missing.append(f"{silo} round {rnd} {phase}: plain metrics sent, no plain-release record")
    if not modes:
        return []
    return [_check("metric-releases-on-ledger", not missing,
                   "metrics.json: " + ("; ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                                       if missing else "every metric sent has its ledger record "
                                       f"({', '.join(f'{n} {m}' for m, n in sorted(modes.items()))} replies)"))]


def audit_run(run_dir: Path, canary: dict[str, Any] | list[dict[str, Any]] | None = None,
              silo_keys: Path | None = None) -> dict[str, Any]:
    """Every check on ``run_dir``; with ``silo_keys`` (a folder of the silos' ledger public keys)
    also ``ledger-signatures`` (:func:`signature_check`)."""
    run_dir = Path(run_dir)
    doc = read_metrics(run_dir) if (run_dir / "metrics.json").is_file() else None  # AuditInputError: exit 2
    info = doc["run"] if doc else {}
    checks: list[dict[str, Any]] = []
    result: dict[str, Any] = {"run-dir": str(run_dir), "run-id": info.get("run-id"), "checks": checks, "silos": {}}
    records: list[Record]
    try:
        lines = read_lines(run_dir / LEDGER_NAME)
        records = [x[2] for x in lines]
        checks.append(_check("ledger-integrity", bool(records), f"{len(records)} records, hash chain verified"
                             if records else f"{run_dir / LEDGER_NAME}: no records (no DP training recorded)"))
    except LedgerError as exc:
        checks.append(_check("ledger-integrity", False, str(exc)))
        records, lines = [], []
    line_of = {id(x[2]): x[0] for x in lines}
    owner = run_folder_checks(run_dir, doc, lines) if doc else silo_folder_checks(run_dir, lines) if lines else []
    if silo_keys is not None:
        checks.append(signature_check(Ledger(run_dir / LEDGER_NAME), silo_keys))
    if info.get("run-id") is not None:
        records = of_run(records, info["run-id"])
    rounds = spending(records)  # DP-SGD rounds and Gaussian releases, in ledger order
    result["outside-epsilon"] = [r.to_dict() for r in records if isinstance(r, PlainRelease)]
    result["refusals"] = [r.to_dict() for r in refusals(records)]
    result["policies"] = silo_policies(run_dir, info.get("run-id"))
    several_runs = len({r.run_id for r in rounds}) > 1  # a silo's own ledger: audit each run
    result["several-runs"] = several_runs
    per_silo: dict[str, list[Spending]] = {}
    for r in rounds:
        per_silo.setdefault(f"{r.silo} (run {r.run_id})" if several_runs else r.silo, []).append(r)
    all_history = []
    delta = None
    for silo, recs in sorted(per_silo.items()):
        recs.sort(key=lambda r: r.round)
        delta = recs[-1].delta
        accountant = recs[-1].accountant
        history = history_of(recs)
        all_history += history
        re = recompute(history, delta, accountant)
        # every record's cumulative ε against its own prefix
        worst_prefix, worst = max((abs(r.epsilon_cumulative - (re.opacus_ledger_accountant if i == len(recs) - 1 else
                                  opacus_epsilon(accountant, history[: i + 1], delta))), i)
                                  for i, r in enumerate(recs))
        reported = recs[-1].epsilon_cumulative
        label = accountant_label(accountant)
        sgd = [r for r in recs if isinstance(r, DpSgdRound)]
        lifetime, runs = (sgd[-1].epsilon_lifetime, sgd[-1].runs_on_ledger) if sgd else (None, None)
        result["silos"][silo] = {
            "rounds": [r.round for r in recs], "delta": delta, "accountant": label,
            "epsilon-reported": reported, "epsilon-budget": recs[-1].epsilon_budget,
            "epsilon-recomputed-opacus": re.opacus_ledger_accountant,
            "epsilon-opacus-rdp-integer-orders": re.opacus_rdp_int,
            "epsilon-dp-accounting-rdp-integer-orders": re.dpacc_rdp_int,
            "cross-accountant": re.spread, "cross-accountant-spread": re.cross_spread,
            "epsilon-lifetime": reported if lifetime is None else lifetime,
            "runs-on-ledger": 1 if runs is None else runs,
            "epsilon-by-round": [r.epsilon_cumulative for r in recs],
            "kinds": [r.KIND for r in recs],
            **by_kind(recs, delta, accountant),
        }
        checks.append(_check(f"recompute-opacus:{silo}", worst_prefix <= TOLERANCE,
                             f"ledger ε vs {label} recomputed from (σ, q, steps): max |Δ| {worst_prefix:.2e} over "
                             f"{len(recs)} records (δ={delta:g})" + ("" if worst_prefix <= TOLERANCE else
                             f"; worst: {LEDGER_NAME}:{line_of.get(id(recs[worst]), '?')} (round {recs[worst].round})")))
        checks.append(_check(f"recompute-dp-accounting:{silo}", re.same_accountant_diff <= TOLERANCE,
                             f"Opacus RDP {re.opacus_rdp_int:.5f} vs dp-accounting RDP {re.dpacc_rdp_int:.5f} "
                             f"(same integer orders, δ={delta:g}): |Δ| {re.same_accountant_diff:.2e}"))
        checks.append(_check(f"within-budget:{silo}", reported <= recs[-1].epsilon_budget + 1e-6,
                             f"ε={reported:.4f} ≤ budget {recs[-1].epsilon_budget:g} (δ={delta:g}, {label})"))
    if all_history and delta is not None:
        result["cross-silo"] = {
            "delta": delta, "silos": len(per_silo),
            "epsilon-user-on-every-silo-opacus-rdp": opacus_rdp(all_history, delta),
            **{f"epsilon-user-on-every-silo {k}": v for k, v in recompute(all_history, delta, "rdp").spread.items()
               if k != "Opacus RDP (default α)"},
        }
    checks += [_check(*c) for c in owner]
    checks.extend(release_checks(doc, records))
    if canary is not None:
        result["canaries"] = [canary] if isinstance(canary, dict) else list(canary)
        for c in result["canaries"]:
            checks.append(_check(f"canary-lower-bound:{c.get('kind', 'input')}", bool(c["passed"]),
                                 f"ε lower bound {c['epsilon_lower_bound']:.4f} (95 %, pure-ε, {c['correct']}/"
                                 f"{c['guesses']} correct of M={c['m']}) vs ledger ε={c['ledger_epsilon']:.4f} "
                                 f"(δ={c['delta']:g}, {c['accountant']}) on silo {c['silo']}"))
    result["passed"] = bool(checks) and all(c["passed"] for c in checks)
    return result


def signature_check(ledger: Ledger, silo_keys: Path) -> dict[str, Any]:
    """``ledger-signatures``: every line of ``ledger`` signed by its silo's key from ``silo_keys``
    (:mod:`shared_model.privacy.ledger_signatures`). An unreadable ledger fails here too."""
    from shared_model.privacy.ledger_signatures import signature_problems

    try:
        lines = ledger.read()
    except LedgerError as exc:
        return _check("ledger-signatures", False, f"not checked: {exc}")
    problems = signature_problems(lines, silo_keys, ledger.path.name)
    detail = (f"{len(lines)} records, each signed by its silo's key in {silo_keys}" if not problems else
              f"{len(problems)} of {len(lines)} records fail: " + "; ".join(problems[:5]) + (" …" if len(problems) > 5 else ""))
    return _check("ledger-signatures", bool(lines) and not problems, detail if lines else f"{ledger.path}: no records")


def write_report(run_dir: Path, result: dict[str, Any], out: Path | None = None) -> None:
    """Write ``audit.md`` and ``audit-epsilon.png`` into ``out`` (default ``run_dir``)."""
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Privacy audit of {run_dir}", "", f"Result: **{'PASS' if result['passed'] else 'FAIL'}**", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'pass' if c['passed'] else 'FAIL'} | {c['detail']} |" for c in result["checks"]]
    lines += ["", "## ε per silo (cumulative, this run)", "",
              "| silo | δ | reported (accountant) | Opacus recomputed | Opacus RDP int α | dp-accounting RDP int α | dp-accounting PLD | lifetime ε (runs) |",
              "|---|---|---|---|---|---|---|---|"]
    for silo, s in result["silos"].items():
        lines.append(f"| {silo} | {s['delta']:g} | {s['epsilon-reported']:.4f} ({s['accountant']}) | {s['epsilon-recomputed-opacus']:.4f} | "
                     f"{s['epsilon-opacus-rdp-integer-orders']:.4f} | {s['epsilon-dp-accounting-rdp-integer-orders']:.4f} | "
                     f"{s['cross-accountant'].get('dp-accounting PLD', float('nan')):.4f} | {s['epsilon-lifetime']:.4f} ({s['runs-on-ledger']}) |")
    if "cross-silo" in result:
        cs = result["cross-silo"]
        lines += ["", "## Every run on the silo's ledger composed (its lifetime)", "",
                  f"Every audited run's mechanisms composed (δ={cs['delta']:g}):", ""] if result.get("several-runs") else [
                  "", "## A user present on every silo", "",
                  f"Worst case: the silos' mechanisms composed (δ={cs['delta']:g}):", ""]
        lines += [f"- {k}: {v:.4f}" for k, v in cs.items() if k.startswith("epsilon")]
    if result.get("policies"):
        lines += ["", "## Each silo's own privacy policy (the run config is only a request)", "",
                  "| silo | policy | refusals on its own ledger (rules) | file |", "|---|---|---|---|"]
        lines += [f"| {silo} | {p['describe']} | {p['refusals-on-own-ledger']} ({', '.join(p['rules']) or '-'}) | "
                  f"{p['file']} |" for silo, p in result["policies"].items()]
    if result.get("refusals"):
        lines += ["", "## Refusals (the silo's policy or budget rules; a refusal spends nothing)", "",
                  "| silo | run | round | rule | reason |", "|---|---|---|---|---|"]
        lines += [f"| {r['silo']} | {r['run-id']} | {r['round']} | {r['rule']} | {r['reason']} |" for r in result["refusals"]]
    if result.get("canaries"):
        lines += ["", "## Canary audit (Steinke, Nasr & Jagielski, NeurIPS 2023, one run)", "",
                  "| kind | silo | M | included | guesses (in/out) | correct | ε lower bound (95 %) | claimed ε | share | |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in result["canaries"]:
            share = c["epsilon_lower_bound"] / c["ledger_epsilon"] if c["ledger_epsilon"] else float("nan")
            lines.append(f"| {c.get('kind', 'input')} | {c['silo']} | {c['m']} | {c['included']} | {c['guesses']} "
                         f"({c['k_in']}/{c['k_out']}) | {c['correct']} | {c['epsilon_lower_bound']:.4f} | "
                         f"{c['ledger_epsilon']:.4f} (δ={c['delta']:g}, {c['accountant']}) | {share:.0%} | "
                         f"{'pass' if c['passed'] else 'FAIL: bound above the claim'} |")
        lines += ["", "input: fake users, scored on the final model (black-box). gradient: Dirac canaries of norm C "
                  "added to the clipped gradient sum before the noise, each step w.p. the sampler's q, scored on "
                  "every step's noisy sum (white-box)."]
        for c in result["canaries"]:
            if c.get("kind") == "gradient":
                lines.append(f"Gradient canaries: {c['steps']} steps at q={c['sample_rate']:.4g}, σ={c['noise_multiplier_recorded']:.4g}; "
                             f"{c['participated']} of {c['included']} included canaries were sampled at least once; "
                             f"the excluded ones' readings have std {c.get('reading_std_out', float('nan')):.3g}·C "
                             f"(the noise σ·C plus real-data gradients).")
        if any(c["broken_noise"] for c in result["canaries"]):
            lines.append("AUDIT-BROKEN-NOISE was set: the silo trained with σ=0 while its ledger records σ.")
    lines += audit_page.sections(result)
    write_bytes_atomic(out / "audit.md", ("\n".join(lines) + "\n").encode())
    audit_page.plot(run_dir, result, out)
