"""``fedshift deploy``: credentials for a Flower deployment, and a whole deployment on one machine.

* ``deploy certs DIR``: CA + SuperLink TLS certificate (:mod:`fedshift.deploy_credentials`);
* ``deploy keys DIR --silos a,b``: one SuperNode key pair per silo;
* ``deploy local --silos N --out DIR``: SuperLink (TLS, node authentication, database) and one
  SuperNode OS process per silo on 127.0.0.1 (:mod:`fedshift.deployment`), the app submitted
  with ``flwr run``; the same outputs as ``fedshift simulate`` in DIR (``silo-keys`` included).
  Secure aggregation is on unless ``--set secure-aggregation=false``.

Bad input (an unknown ``--set`` key, a dataset folder without those silos, a silo folder that
is not a silo, a missing certificate, a wrong key, an unreadable policy) is one line on
stderr and exit 2, before any process starts.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from fedshift.config_args import add_set_argument, refuse
from fedshift.flower_processes import terminate
from fedshift.deploy_credentials import Certificates, CredentialError, check_supernode_key, write_certificates, write_supernode_keys


def certs(args: argparse.Namespace) -> int:
    hosts = [h for item in args.san or () for h in item.split(",") if h]
    made = write_certificates(Path(args.dir), hosts=hosts)
    print(f"CA {made.ca_cert}; SuperLink certificate {made.server_cert} (key {made.server_key}) "
          f"for 127.0.0.1, localhost{''.join(', ' + h for h in hosts)}")
    return 0


def keys(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.silos.split(",") if s.strip()]
    if not names:
        return refuse("deploy keys", ValueError("--silos: give at least one silo name"))
    try:
        made = write_supernode_keys(Path(args.dir), names)
    except CredentialError as exc:
        return refuse("deploy keys", exc)
    for key in made:
        print(f"{key.silo}: private {key.private} (0600, flower-supernode --auth-supernode-private-key); "
              f"public {key.public} (flwr supernode register)")
    return 0


def _check_silo(folder: Path) -> None:
    if not any((folder / f"events.csv{z}").is_file() for z in ("", ".gz")):
        raise ValueError(f"{folder}: not a silo folder (no events.csv or events.csv.gz)")


def local_plan(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The validated run config and the silos to deploy (``ValueError`` on bad input)."""
    from fedshift.simulate_cmd import simulate_config
    from shared_model.dataset import list_silos, require_valid_dataset

    ns = argparse.Namespace(preset=args.preset, dataset=args.dataset, layout=getattr(args, "layout", None),
                            base_model=args.base_model, rounds=args.rounds, epsilon=None, seed=None, no_dp=False,
                            set=args.set)
    cfg = simulate_config(ns)
    available = list_silos(cfg.dataset_dir())
    if not available:
        raise ValueError(f"{cfg.dataset_dir()}: no silos (expected silos/<name>/events.csv)")
    if not 1 <= args.silos <= len(available):
        raise ValueError(f"--silos {args.silos}: {cfg.dataset_dir()} has {len(available)} silos")
    silos = available[: args.silos]
    for silo in silos:
        _check_silo(cfg.dataset_dir() / "silos" / silo)
    require_valid_dataset(cfg.dataset_dir(), silos)  # DataError: every bad file:line, before anything starts
    if not any(item.split("=", 1)[0].strip() == "min-nodes" for item in args.set or ()):
        cfg = cfg.replace(**{"min-nodes": len(silos)})
    if not any(item.split("=", 1)[0].strip() == "secure-aggregation" for item in args.set or ()):
        cfg = cfg.replace(**{"secure-aggregation": True})  # on by default here (--set secure-aggregation=false)
    if cfg.min_nodes > len(silos):
        raise ValueError(f"min-nodes = {cfg.min_nodes} but only {len(silos)} silos are deployed: no round would start")
    return cfg.replace(**{"out-dir": str(Path(args.out).expanduser().resolve())}), silos


def resumed_silos(run_dir: Path) -> list[str]:
    """The silos a deployment in ``run_dir`` ran (``deployment.json``), for ``--resume``."""
    manifest = run_dir / "deployment.json"
    try:
        silos = list(json.loads(manifest.read_text(encoding="utf-8"))["silos"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{manifest}: not a readable deployment manifest ({exc}); "
                         f"{run_dir} is not a `deploy local` run") from None
    if not silos:
        raise ValueError(f"{manifest}: names no silo")
    return silos


def local(args: argparse.Namespace) -> int:
    from fedshift.deployment import DeploymentError, LocalDeployment
    from fedshift.simulate_cmd import resume_or_done
    from fedshift.simulation import prepare_item_index
    from shared_model.privacy.policy import load_policy

    if args.resume:
        plan = resume_or_done("deploy local", args, args.out)
        if isinstance(plan, int):
            return plan
    elif args.silos is None or args.out is None:
        return refuse("deploy local", ValueError("--silos N and --out DIR are required (or --resume RUN_DIR)"))
    out = plan.run_dir if args.resume else Path(args.out).expanduser().resolve()
    try:
        if args.resume:
            cfg, silos = plan.cfg, resumed_silos(out)
            if args.silos is not None and args.silos != len(silos):
                raise ValueError(f"--silos {args.silos} conflicts with the {len(silos)} silos of {out}")
        else:
            cfg, silos = local_plan(args)
        dep = LocalDeployment(out, cfg.dataset_dir(), silos, resumed=bool(args.resume))
        if args.certs:
            dep.certs = Certificates(Path(args.certs).expanduser().resolve()).check()
        if args.keys:
            for silo in silos:
                folder = Path(args.keys).expanduser().resolve()
                dep.keys[silo] = type(dep.keys[silo])(silo, folder / f"{silo}.key", folder / f"{silo}.pub")
                check_supernode_key(dep.keys[silo].private, dep.keys[silo].public)
        for silo in silos:  # an existing policy must parse before anything starts
            if dep.disk(silo).policy.exists():
                load_policy(dep.disk(silo).policy)
    except (ValueError, CredentialError) as exc:  # ConfigError, PolicyError are ValueErrors
        return refuse("deploy local", exc)

    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    status = "not started"
    try:
        dep.prepare(allow_non_private=args.allow_non_private)
        print(f"fedshift deploy local: {len(silos)} silos ({', '.join(silos)}) as SuperNodes over TLS with "
              f"node authentication; results: {out}", flush=True)
        prepare_item_index(cfg, progress=False)
        dep.start_superlink()
        for silo in silos:
            dep.register(silo)
            dep.start_supernode(silo)
        dep.wait_online(silos)  # every silo in round 1, even when min-nodes is below their number
        dep.write_manifest()
        print(f"SuperLink 127.0.0.1:{dep.port}; node ids "
              + ", ".join(f"{s}={n}" for s, n in dep.node_ids.items()), flush=True)
        status = dep.submit(cfg, sys.stdout, verbose=args.verbose)
    except DeploymentError as exc:
        print(f"fedshift deploy local: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedshift deploy local: interrupted; stopping the processes it started", file=sys.stderr)
        return 130
    finally:
        dep.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ok = status == "finished:completed" and (out / "metrics.json").is_file()
    print(f"\nflower run status: {status}; log {out / 'flwr.log'}", flush=True)
    if not ok:
        print(f"fedshift deploy local: the run did not complete ({status}); see {out / 'flwr.log'}", file=sys.stderr)
        return 1
    from shared_model.run_health import report_problems

    return report_problems("deploy local", out / "metrics.json", sys.stderr)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("deploy", help="deploy on Flower's Deployment Engine (TLS, node authentication)",
                       description="Credentials for a Flower deployment, or a whole deployment on one machine "
                                   "(docs/deploy.md has every command for N machines).")
    dsub = p.add_subparsers(dest="deploy_command", metavar="SUBCOMMAND")
    dsub.required = True
    c = dsub.add_parser("certs", help="a CA and a SuperLink TLS certificate (SAN 127.0.0.1, localhost, --san …)")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--san", "--host", action="append", metavar="HOST",
                   help="another IP address or DNS name the SuperLink is reached at (repeatable, comma-separated)")
    c.set_defaults(func=certs)
    k = dsub.add_parser("keys", help="one SuperNode key pair (NIST P-384, OpenSSH format) per silo")
    k.add_argument("dir", metavar="DIR")
    k.add_argument("--silos", required=True, metavar="A,B,…", help="silo names")
    k.set_defaults(func=keys)
    loc = dsub.add_parser(
        "local", help="SuperLink + one SuperNode process per silo on 127.0.0.1; run the app",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Start flower-superlink (TLS, --enable-supernode-auth, --database), register one key per\n"
            "silo, start one flower-supernode per silo with its own disk under OUT/silos/<silo>/\n"
            "(data copy, state, policy.toml), submit the app with flwr run and stream the per-round\n"
            "table. Writes what `fedshift simulate` writes to OUT, plus deployment.json and the\n"
            "processes' logs, and OUT/silo-keys (the silos' ledger public keys, for `fedshift audit\n"
            "OUT --silo-keys OUT/silo-keys`). Secure aggregation is ON unless --set\n"
            "secure-aggregation=false. Exit 0 only when Flower reports the run completed; 1 when not;\n"
            "2 on bad input (nothing started)."),
    )
    loc.add_argument("--silos", type=int, metavar="N", help="deploy the first N silos of the dataset (required "
                     "unless --resume)")
    loc.add_argument("--out", metavar="DIR", help="deployment and results folder (required unless --resume)")
    loc.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted `deploy local` run from its last "
                     "checkpoint: same certificates, keys and silo disks (their ledgers continue, each silo "
                     "charging the rounds to the original run's budget), a fresh SuperLink database")
    loc.add_argument("--dataset", metavar="DIR", help="dataset folder (default: bundled data/amazon-art-office)")
    loc.add_argument("--layout", metavar="NAME", help="the dataset's layout: platforms (default) or layouts/NAME/, "
                     "e.g. regions (one region SuperNode per region, holding every platform)")
    loc.add_argument("--base-model", metavar="DIR", help="local BERT checkpoint (default: bundled all-MiniLM-L6-v2)")
    loc.add_argument("--preset", choices=["quick", "full"], default="quick")
    loc.add_argument("--rounds", type=int, help="server rounds (overrides the preset)")
    loc.add_argument("--certs", metavar="DIR", help="use this CA/SuperLink certificate folder (`deploy certs`)")
    loc.add_argument("--keys", metavar="DIR", help="use these SuperNode keys (`deploy keys`), <silo>.key/.pub")
    add_set_argument(loc, "any [tool.flwr.app.config] key, e.g. --set local-steps=16 (repeatable)")
    loc.add_argument("--allow-non-private", action="store_true",
                     help="write silo policies that allow non-private training (the silos' choice, not the run's)")
    loc.add_argument("-v", "--verbose", action="store_true", help="show Flower's whole log")
    loc.set_defaults(func=local)
    return p
