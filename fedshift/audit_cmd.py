"""``fedshift audit RUN_DIR``: check a run's privacy claims from its ledger.

Glue only: the ledger audit is :mod:`shared_model.privacy.audit_report`, the canary
audit (a fresh training on one silo) :mod:`fl_client.canary_audit`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def audit(args: argparse.Namespace) -> int:
    from shared_model.privacy.audit_report import audit_run, write_report
    from shared_model.privacy.ledger import LEDGER_NAME
    from shared_model.privacy.owner_checks import AuditInputError, read_metrics
    from shared_model.privacy.policy import POLICY_NAME

    run_dir = Path(args.run_dir).expanduser().resolve()
    is_run = (run_dir / "metrics.json").is_file()
    if not is_run and not (run_dir / LEDGER_NAME).is_file() and not (run_dir / POLICY_NAME).is_file():
        print(f"fedshift audit: {run_dir}: neither a run folder (no metrics.json) nor a silo's state folder "
              f"(no {LEDGER_NAME} or {POLICY_NAME})", file=sys.stderr)
        return 2
    canary = None
    if args.canaries:
        from fedshift.config_args import parse_set, refuse
        from fl_client.canary_audit import KINDS, run_canary_audits
        from shared_model.config import RunConfig

        if not is_run:
            print(f"fedshift audit: {run_dir}: --canaries needs a run folder (its metrics.json names the run's config)",
                  file=sys.stderr)
            return 2
        try:
            conf = read_metrics(run_dir)["run"].get("config") or {}
        except AuditInputError as e:
            print(f"fedshift audit: {e}", file=sys.stderr)
            return 2
        try:
            cfg = RunConfig.from_run_config({**conf, **parse_set(args.set)})
        except ValueError as e:
            return refuse("audit", e)
        kinds = KINDS if args.canary_kind == "both" else (args.canary_kind,)
        try:
            canary = [r.as_dict() for r in run_canary_audits(
                cfg, args.canaries, run_dir / "audit-canaries", kinds=kinds, silo_index=args.canary_silo,
                seed=args.canary_seed, k=args.canary_guesses)]
        except ValueError as e:
            return refuse("audit", e)
    from shared_model.privacy.policy import PolicyError

    from shared_model.signing import SigningKeyError

    silo_keys = Path(args.silo_keys).expanduser() if args.silo_keys else None
    if silo_keys is not None and not silo_keys.is_dir():
        print(f"fedshift audit: {silo_keys}: --silo-keys folder not found", file=sys.stderr)
        return 2
    try:
        result = audit_run(run_dir, canary, silo_keys=silo_keys)
    except (PolicyError, AuditInputError, SigningKeyError) as e:
        print(f"fedshift audit: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve() if args.out else run_dir
    write_report(run_dir, result, out)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print((out / "audit.md").read_text())
    return 0 if result["passed"] else 1


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "audit",
        help="check a run's privacy claims (ledger recomputation, canary lower bound)",
        description=(
            "Audit the differential-privacy claims of the run in RUN_DIR without trusting the\n"
            "training code. Reads RUN_DIR/ledger.jsonl (the silos' per-round records: σ, q,\n"
            "steps, δ, accountant, ε) and RUN_DIR/metrics.json, and checks:\n"
            "  ledger-integrity         the hash chain of every record verifies\n"
            "  recompute-opacus         each silo's ε recomputed with Opacus from (σ, q, steps)\n"
            "                           equals the reported ε within 1e-3\n"
            "  recompute-dp-accounting  Opacus RDP and Google's dp-accounting RDP agree within\n"
            "                           1e-3 on the same (integer) orders; the spread against\n"
            "                           dp-accounting PLD is reported\n"
            "  within-budget            no silo spent more than its budget\n"
            "  run-records              a DP run has records of the run id metrics.json names\n"
            "  rounds-on-ledger         every silo-round of metrics.json and every checkpoint has\n"
            "                           its ledger record; σ, q, steps, δ, ε and model-sha256 (=\n"
            "                           the update the server received) agree\n"
            "  silo-ledger:SILO         RUN_DIR/silo-state/SILO/ledger.jsonl verifies, equals the\n"
            "                           server's copy record by record, and meets SILO's policy.toml\n"
            "  ledger-signatures        with --silo-keys DIR: every record carries its silo's\n"
            "                           Ed25519 signature and it verifies with DIR/<silo>.pub\n"
            "                           (or DIR/<silo>/ledger-signing.pub); a record edited and\n"
            "                           re-chained by hand, or an unsigned one, fails\n"
            "  canary-lower-bound:KIND  with --canaries M: a fresh one-silo training with M\n"
            "                           canaries of each kind (each in w.p. 1/2) gives an\n"
            "                           empirical ε lower bound (Steinke, Nasr & Jagielski 2023,\n"
            "                           95 %) that must not exceed the ledger's ε. Kinds: input\n"
            "                           (fake users, scored on the final model) and gradient\n"
            "                           (white-box Dirac canaries in the clipped gradient sum,\n"
            "                           sampled at the sampler's rate, scored per step)\n"
            "It also reports each release kind's ε alone and its share of each silo's ε (DP-SGD\n"
            "rounds; Gaussian metric, popularity and transition releases), the worst-case ε of a\n"
            "user present on every silo, and lists the\n"
            "refusals on the ledger (the silo's own policy or a budget rule refused a round;\n"
            "a refusal spends no ε) and each silo's policy (RUN_DIR/silo-state/<silo>/policy.toml).\n\n"
            "RUN_DIR may instead be a silo's state folder (<state-dir>/<silo>: its ledger.jsonl\n"
            "and policy.toml): every run on its ledger is recomputed and checked against its\n"
            "policy (silo-policy). Every failure names file:line (docs/audit.md).\n\n"
            "Writes RUN_DIR/audit.md and RUN_DIR/audit-epsilon.png (or into --out DIR). Exit\n"
            "status: 0 all checks "
            "pass, 1 a check failed, 2 RUN_DIR is neither kind of folder, or its metrics.json, a\n"
            "checkpoint's fedshift.json or a silo policy is unreadable, or a --silo-keys file is not a key (one line naming the file)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `fedshift simulate` results folder, or a silo's state folder")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write audit.md and audit-epsilon.png into DIR (created) instead of RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the machine-readable result instead of Markdown")
    p.add_argument("--silo-keys", metavar="DIR", help="the silos' ledger public keys (RUN/silo-keys, written by "
                   "`fedshift simulate`): check every record's signature")
    p.add_argument("--canaries", type=int, default=0, metavar="M", help="run the canary audit with M canaries")
    p.add_argument("--canary-silo", type=int, default=0, metavar="I", help="silo (sorted index) that gets the canaries")
    p.add_argument("--canary-seed", type=int, default=0, help="seed of canary inclusion and training")
    p.add_argument("--canary-kind", choices=("both", "input", "gradient"), default="both",
                   help="which canaries to insert (default both, in one training)")
    p.add_argument("--canary-guesses", type=int, default=None, metavar="K",
                   help="input: guess 'in' on the K highest and 'out' on the K lowest scores (default M/4); "
                        "gradient: 'in' on the K highest (default planned from the claimed σ, q, steps)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override the run's config for the canary training (repeatable)")
    p.set_defaults(func=audit)
    return p
