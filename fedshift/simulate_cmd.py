"""``fedshift simulate``: parse the flags into a typed run config and call
:func:`fedshift.simulation.run_simulation`; ``--resume RUN_DIR`` continues an interrupted
run from its last checkpoint (:func:`shared_model.run_folder.resume_plan`) with its recorded
config, silo state folder and secrets."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedshift.config_args import add_set_argument, parse_set, refuse
from shared_model.config import PRESETS, RunConfig

if TYPE_CHECKING:
    from shared_model.run_folder import ResumePlan


def simulate_config(args: argparse.Namespace) -> RunConfig:
    """The preset, then the flags, then ``--set`` items, as one validated config
    (``shared_model.config.ConfigError`` on an unknown key or a bad value; nothing is created)."""
    from shared_model.dataset import list_silos

    sets = parse_set(args.set)
    values = dict(PRESETS[args.preset])
    from shared_model.layouts import layout_dir

    base = Path(args.dataset).expanduser().resolve() if args.dataset else RunConfig().dataset_dir()
    values["dataset"] = str(layout_dir(base, getattr(args, "layout", None)))  # ValueError: no such layout
    if args.base_model:
        values["base-model"] = str(Path(args.base_model).expanduser().resolve())
    for flag, key in (("rounds", "num-server-rounds"), ("epsilon", "epsilon"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    if args.no_dp:
        values["dp"] = False
    values.update(sets)
    from shared_model.layouts import with_region_defaults

    values = with_region_defaults(values, Path(values["dataset"]))  # region silos: read histories per platform
    cfg = RunConfig().replace(**values)
    if "min-nodes" not in values:  # a simulation waits for every silo's SuperNode
        cfg = cfg.replace(**{"min-nodes": max(len(list_silos(cfg.dataset_dir())), 1)})
    return cfg


def explicit_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config values the flags set explicitly (dashed keys), for ``--resume`` to
    compare with the recorded run (``--preset`` is not compared: the run keeps its own)."""
    from shared_model.layouts import layout_dir

    values: dict[str, Any] = {}
    if getattr(args, "dataset", None) or getattr(args, "layout", None):
        base = Path(args.dataset).expanduser().resolve() if getattr(args, "dataset", None) else RunConfig().dataset_dir()
        values["dataset"] = str(layout_dir(base, getattr(args, "layout", None)))
    if getattr(args, "base_model", None):
        values["base-model"] = str(Path(args.base_model).expanduser().resolve())
    for flag, key in (("rounds", "num-server-rounds"), ("epsilon", "epsilon"), ("seed", "seed")):
        if getattr(args, flag, None) is not None:
            values[key] = getattr(args, flag)
    if getattr(args, "no_dp", False):
        values["dp"] = False
    return {**values, **parse_set(args.set)}


def resume_or_done(command: str, args: argparse.Namespace, out_flag: str | None) -> "ResumePlan | int":
    """The plan for ``--resume RUN_DIR`` (``out_flag``: an --out given with it, which must be
    RUN_DIR), or the exit status: 2 with one line for a folder that cannot be resumed, 0 with
    a message when the run has no rounds left."""
    from shared_model.run_folder import ResumeError, resume_plan

    try:
        plan = resume_plan(args.resume, explicit_values(args))
        if out_flag and Path(out_flag).expanduser().resolve() != plan.run_dir:
            raise ResumeError(f"--out {out_flag}: a resumed run writes into its own folder {plan.run_dir}")
    except ValueError as exc:  # ResumeError, SetError
        return refuse(command, exc)
    if plan.finished:
        print(f"fedshift {command}: run {plan.run_id} in {plan.run_dir} already completed its "
              f"{plan.cfg.num_server_rounds} rounds (last checkpoint {plan.checkpoint.name}); nothing to resume")
        return 0
    print(f"fedshift {command}: resuming run {plan.run_id} from {plan.checkpoint.name}: rounds "
          f"{plan.last_round + 1}-{plan.cfg.num_server_rounds}", flush=True)
    return plan


def simulate(args: argparse.Namespace) -> int:
    from fedshift.simulation import recorded_state_dir, run_simulation

    if args.resume:
        plan = resume_or_done("simulate", args, args.out)
        if isinstance(plan, int):
            return plan
        try:
            state_dir = recorded_state_dir(plan.run_dir, Path(args.state_dir) if args.state_dir else None)
            result = run_simulation(plan.cfg, plan.run_dir, verbose=args.verbose, timeout=args.timeout,
                                    state_dir=state_dir, allow_non_private=not plan.cfg.dp,
                                    silo_seed=args.silo_seed, **backend_args(args))
        except ValueError as e:
            return refuse("simulate", e)
        return _finish(result)
    out = Path(args.out).expanduser().resolve() if args.out else Path.cwd() / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        cfg = simulate_config(args)
        print(f"fedshift simulate: preset {args.preset}", flush=True)
        result = run_simulation(cfg, out, verbose=args.verbose, timeout=args.timeout,
                                state_dir=Path(args.state_dir) if args.state_dir else None,
                                allow_non_private=args.no_dp, silo_seed=args.silo_seed, **backend_args(args))
    except ValueError as e:  # ConfigError (--set, flags), no silos / min-nodes above them, bad federation key
        return refuse("simulate", e)
    return _finish(result)


def backend_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--federation-config`` items and ``--ray-address`` as :func:`run_simulation` keywords."""
    from fedshift.simulation import parse_federation_items

    return {"federation": parse_federation_items(getattr(args, "federation_config", None) or []),
            "ray_address": getattr(args, "ray_address", None)}


def _finish(result: Any) -> int:
    if result.ok:
        from shared_model.run_health import report_problems

        return report_problems("simulate", result.metrics, sys.stderr)
    print(f"fedshift simulate: the run did not complete ({result.status}); see the log above and {result.log}",
          file=sys.stderr)
    return 1


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    quick = RunConfig()
    full = quick.replace(**PRESETS["full"])
    p = sub.add_parser(
        "simulate",
        help="run the federated DP simulation (one SuperNode per silo)",
        description=(
            "Run fedshift's Flower app as a local simulation with one SuperNode per silo of\n"
            "DATASET: each silo fine-tunes LoRA adapters with Opacus DP-SGD, the server\n"
            "averages them (FedAvg). Prints a per-round table (silo, loss, cumulative ε,\n"
            "next-category accuracy, NDCG@10) and writes to OUT:\n"
            "  metrics.json, metrics.csv   every silo's train/eval metrics per round (round 0 =\n"
            "                              the untrained model)\n"
            "  checkpoints/round-NNN/      peft adapter folder + heads + fedshift.json\n"
            "  flwr.log                    Flower's full log\n\n"
            "This is `flwr run .` with a private FLWR_HOME; the local SuperLink it starts is\n"
            "stopped at the end. Exit status: 0 when Flower reports the run completed and every\n"
            "round had a successful training and evaluation reply, no silo's update failed or\n"
            "was refused; 1 when not (each problem printed, naming the silo); 2 bad input (an\n"
            "unknown --set key or a bad value; nothing is created)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help=f"quick: {quick.num_server_rounds} rounds × {quick.local_steps} DP steps, {quick.max_seq_len} "
                   f"tokens; full: {full.num_server_rounds} × {full.local_steps}, {full.max_seq_len} tokens")
    p.add_argument("--dataset", metavar="DIR", help="dataset folder (default: bundled data/amazon-art-office)")
    p.add_argument("--layout", metavar="NAME", help="the dataset's layout: platforms (the folder itself, default) "
                   "or a layouts/NAME/ folder, e.g. regions (one silo per region holding every platform; "
                   "docs/data-format.md)")
    p.add_argument("--base-model", metavar="DIR", help="local BERT checkpoint (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--out", metavar="DIR", help="results folder (default: runs/<timestamp>)")
    p.add_argument("--rounds", type=int, help="server rounds (overrides the preset)")
    p.add_argument("--epsilon", type=float, help="total ε budget per silo for the whole run")
    p.add_argument("--seed", type=int, help="run seed: initial model and evaluation samples (the silos' "
                   "sampling and noise come from their own secrets, see --silo-seed)")
    p.add_argument("--no-dp", action="store_true", help="train without DP-SGD (a non-private baseline); the "
                   "silos' default policies then allow it (--set dp=false alone is refused by them)")
    p.add_argument("--state-dir", metavar="DIR", help="the simulated silos' state root (ledgers, policy.toml, "
                   "secret per silo; default OUT/silo-state); a stable folder accumulates lifetime ε across runs")
    p.add_argument("--silo-seed", metavar="S", help="local seed of the simulated silos' secrets (sampling and "
                   "noise); default fresh random. Never sent to the server")
    add_set_argument(p, "any [tool.flwr.app.config] key, e.g. --set local-steps=16 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint, "
                   "into RUN_DIR, with its recorded config (a flag that differs is refused), silo state and "
                   "secrets; each silo charges the rounds to the original run's budget on its own ledger")
    p.add_argument("--federation-config", action="append", metavar="KEY=VALUE", default=[],
                   help="Flower's simulation settings (repeatable), e.g. client-resources-num-cpus=1 (one Ray "
                   "actor per CPU; Flower's default is 2 CPUs per actor) or init-args-num-cpus=4; see "
                   "docs/performance.md")
    p.add_argument("--ray-address", metavar="HOST:PORT", help="run the silos on an existing Ray cluster (its head, "
                   "started with `ray start --head`) through Flower's Ray backend instead of a local Ray")
    p.add_argument("--timeout", type=int, default=3600, help="seconds before the run is stopped (default 3600)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's whole log")
    p.set_defaults(func=simulate)
    return p
