"""Run every audit check on a run folder; write ``audit.md`` and ``audit-epsilon.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fl_client.ledger import LEDGER_NAME, Ledger, LedgerError
from fl_client.privacy import ACCOUNTANT_NAMES, ledger_history
from fl_server.audit.accounting import opacus_rdp, recompute
from shared_model.io_utils import write_bytes_atomic

TOLERANCE = 1e-3


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "passed": bool(ok), "detail": detail}


def audit_run(run_dir: Path, canary: dict[str, Any] | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "metrics.json").read_text())["run"] if (run_dir / "metrics.json").is_file() else {}
    checks: list[dict[str, Any]] = []
    result: dict[str, Any] = {"run-dir": str(run_dir), "run-id": info.get("run-id"), "checks": checks, "silos": {}}
    try:
        records = Ledger(run_dir / LEDGER_NAME).read()
        checks.append(_check("ledger-integrity", bool(records), f"{len(records)} records, hash chain verified"
                             if records else f"{run_dir / LEDGER_NAME}: no records (no DP training recorded)"))
    except LedgerError as exc:
        checks.append(_check("ledger-integrity", False, str(exc)))
        records = []
    if info.get("run-id") is not None:
        records = [r for r in records if str(r.get("run-id")) == str(info["run-id"])]
    per_silo: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        per_silo.setdefault(str(r["silo"]), []).append(r)
    all_history = []
    delta = None
    for silo, recs in sorted(per_silo.items()):
        recs.sort(key=lambda r: int(r["round"]))
        delta = float(recs[-1]["delta"])
        accountant = str(recs[-1]["accountant"])
        history = ledger_history(recs)
        all_history += history
        re = recompute(history, delta, accountant)
        # every record's cumulative ε against its own prefix
        worst_prefix = max(abs(float(r["epsilon-cumulative"]) - (re.opacus_ledger_accountant if i == len(recs) - 1 else
                           recompute(history[: i + 1], delta, accountant).opacus_ledger_accountant)) for i, r in enumerate(recs))
        reported = float(recs[-1]["epsilon-cumulative"])
        label = ACCOUNTANT_NAMES.get(accountant, accountant)
        result["silos"][silo] = {
            "rounds": [int(r["round"]) for r in recs], "delta": delta, "accountant": label,
            "epsilon-reported": reported, "epsilon-budget": float(recs[-1]["epsilon-budget"]),
            "epsilon-recomputed-opacus": re.opacus_ledger_accountant,
            "epsilon-opacus-rdp-integer-orders": re.opacus_rdp_int,
            "epsilon-dp-accounting-rdp-integer-orders": re.dpacc_rdp_int,
            "cross-accountant": re.spread, "cross-accountant-spread": re.cross_spread,
            "epsilon-lifetime": float(recs[-1].get("epsilon-lifetime", reported)),
            "runs-on-ledger": int(recs[-1].get("runs-on-ledger", 1)),
            "epsilon-by-round": [float(r["epsilon-cumulative"]) for r in recs],
        }
        checks.append(_check(f"recompute-opacus:{silo}", worst_prefix <= TOLERANCE,
                             f"ledger ε vs {label} recomputed from (σ, q, steps): max |Δ| {worst_prefix:.2e} over "
                             f"{len(recs)} records (δ={delta:g})"))
        checks.append(_check(f"recompute-dp-accounting:{silo}", re.same_accountant_diff <= TOLERANCE,
                             f"Opacus RDP {re.opacus_rdp_int:.5f} vs dp-accounting RDP {re.dpacc_rdp_int:.5f} "
                             f"(same integer orders, δ={delta:g}): |Δ| {re.same_accountant_diff:.2e}"))
        checks.append(_check(f"within-budget:{silo}", reported <= float(recs[-1]["epsilon-budget"]) + 1e-6,
                             f"ε={reported:.4f} ≤ budget {float(recs[-1]['epsilon-budget']):g} (δ={delta:g}, {label})"))
    if all_history and delta is not None:
        result["cross-silo"] = {
            "delta": delta, "silos": len(per_silo),
            "epsilon-user-on-every-silo-opacus-rdp": opacus_rdp(all_history, delta),
            **{f"epsilon-user-on-every-silo {k}": v for k, v in recompute(all_history, delta, "rdp").spread.items()
               if k != "Opacus RDP (default α)"},
        }
    if canary is not None:
        result["canary"] = canary
        checks.append(_check("canary-lower-bound", bool(canary["passed"]),
                             f"ε lower bound {canary['epsilon_lower_bound']:.4f} (95 %, pure-ε, {canary['correct']}/"
                             f"{canary['guesses']} correct of M={canary['m']}) vs ledger ε={canary['ledger_epsilon']:.4f} "
                             f"(δ={canary['delta']:g}, {canary['accountant']}) on silo {canary['silo']}"))
    result["passed"] = bool(checks) and all(c["passed"] for c in checks)
    return result


def write_report(run_dir: Path, result: dict[str, Any]) -> None:
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
        lines += ["", "## A user present on every silo", "",
                  f"Worst case: the silos' mechanisms composed (δ={cs['delta']:g}):", ""]
        lines += [f"- {k}: {v:.4f}" for k, v in cs.items() if k.startswith("epsilon")]
    if "canary" in result:
        c = result["canary"]
        lines += ["", "## Canary audit (Steinke, Nasr & Jagielski, NeurIPS 2023, one run)", "",
                  f"M={c['m']} canaries on silo {c['silo']} ({c['included']} included), guesses {c['guesses']}, correct {c['correct']}, "
                  f"ε lower bound {c['epsilon_lower_bound']:.4f} at {c['confidence']:.0%} vs ledger ε {c['ledger_epsilon']:.4f} "
                  f"(δ={c['delta']:g}, {c['accountant']})" + ("; AUDIT-BROKEN-NOISE was set (σ=0 trained)" if c["broken_noise"] else "")]
    write_bytes_atomic(run_dir / "audit.md", ("\n".join(lines) + "\n").encode())
    _plot(run_dir, result)


def _plot(run_dir: Path, result: dict[str, Any]) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    delta, label = None, ""
    for silo, s in result["silos"].items():
        ax.plot(s["rounds"], s["epsilon-by-round"], marker="o", label=silo)
        delta, label = s["delta"], s["accountant"]
    ax.set_xlabel("round")
    ax.set_ylabel(f"cumulative ε (δ={delta:g}, {label})" if delta else "cumulative ε")
    ax.set_title("ε per silo over rounds")
    if result["silos"]:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(run_dir / "audit-epsilon.png", buf.getvalue())
