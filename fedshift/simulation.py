"""``fedshift simulate``: run the Flower app as a local simulation, one SuperNode per silo.

It is ``flwr run`` on this project with a private, temporary ``FLWR_HOME``: the same
ServerApp, ClientApp and ``[tool.flwr.app.config]`` as ``flwr run .``. Before launching,
it embeds the public catalogue once (cached), so silos start training at once. Afterwards
it checks that Flower reports the run ``finished:completed`` and stops the local
SuperLink it started, so no background process is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from shared_model.config import PRESETS, RunConfig

APP_DIR = Path(__file__).resolve().parents[1]
FLOWER_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
_LOG_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)?(INFO|WARNING|ERROR|DEBUG)\s*(\x1b\[0m)?:\s*")
_DATED = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Preset values, then explicit flags, as Flower run-config overrides."""
    overrides: dict[str, Any] = dict(PRESETS[args.preset])
    overrides["dataset"] = str(Path(args.dataset).expanduser().resolve()) if args.dataset else str(RunConfig().dataset_dir())
    if args.base_model:
        overrides["base-model"] = str(Path(args.base_model).expanduser().resolve())
    for flag, key in (("rounds", "num-server-rounds"), ("epsilon", "epsilon"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.no_dp:
        overrides["dp"] = False
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"fedshift simulate: --set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_scalar(raw.strip())
    known = set(RunConfig().to_run_config())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"fedshift simulate: unknown config keys {unknown}; see pyproject.toml [tool.flwr.app.config]")
    return overrides


def _parse_scalar(raw: str) -> Any:
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    if raw.lower() in {"true", "false"}:
        return raw.lower() == "true"
    return raw.strip("'\"")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_superlink_env(flwr_home: Path) -> dict[str, str]:
    """Environment for `flwr` with a private FLWR_HOME and its own local SuperLink ports,
    so concurrent simulations on one machine never share (or stop) each other's SuperLink."""
    return {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }


def stop_local_superlink(flwr_home: Path) -> int:
    """Stop every process (and its children) started for this FLWR_HOME; return how many."""
    stopped = 0
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "flower-superlink" in cmd and str(flwr_home) in cmd:
            family = proc.children(recursive=True) + [proc]
            for p in family:
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(family, timeout=10)
            for p in alive:
                p.kill()
            stopped += len(family)
    return stopped


def run_status(flwr_home: Path, env: dict[str, str]) -> str:
    """Status of the newest run Flower knows of in this FLWR_HOME (e.g. ``finished:completed``)."""
    out = subprocess.run(
        [shutil.which("flwr") or "flwr", "ls", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return f"unknown ({out.stdout.strip()[:200]} {out.stderr.strip()[:200]})"
    if not runs:
        return "no run"
    newest = max(runs, key=lambda r: r.get("pending-at", ""))
    return str(newest.get("status"))


def prepare_item_index(cfg: RunConfig) -> None:
    """Embed the public catalogue once in this process (cached for every silo)."""
    from shared_model.dataset import load_catalogue
    from shared_model.item_index import build_item_index

    build_item_index(load_catalogue(cfg.dataset_dir()), cfg.base_model or None, cfg.max_item_tokens, progress=True)


def simulate(args: argparse.Namespace) -> int:
    from shared_model.dataset import list_silos

    overrides = run_config_overrides(args)
    dataset = Path(overrides["dataset"])
    silos = list_silos(dataset)
    if not silos:
        print(f"fedshift simulate: {dataset}: no silos (expected silos/<name>/events.csv)", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve() if args.out else Path.cwd() / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    overrides["out-dir"] = str(out)
    # Simulated silos keep their privacy ledgers inside the run folder (so `fedshift audit
    # OUT` finds them and tests never touch ~); pass --set state-dir=DIR for a stable place
    # that accumulates a silo's lifetime spend across runs.
    overrides.setdefault("state-dir", str(out / "silo-state"))
    overrides.setdefault("min-nodes", len(silos))
    cfg = RunConfig.from_run_config({**RunConfig().to_run_config(), **overrides})

    print(f"fedshift simulate: preset {args.preset}, {len(silos)} silos ({', '.join(silos)}), "
          f"{cfg.num_server_rounds} rounds, ε={cfg.epsilon:g} per silo, δ={cfg.delta:g}, accountant {cfg.accountant}")
    print(f"results: {out}")
    prepare_item_index(cfg)

    flwr_home = Path(tempfile.mkdtemp(prefix="fedshift-flwr-"))
    env = local_superlink_env(flwr_home)
    config_file = flwr_home / "run-config.toml"
    config_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in sorted(overrides.items())))
    cmd = [
        shutil.which("flwr") or "flwr", "run", str(APP_DIR), "--stream",
        "--run-config", str(config_file),
        "--federation-config", f"num-supernodes={len(silos)}",
    ]
    started = time.time()
    log_path = out / "flwr.log"
    status = "not started"
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            _relay(proc.stdout, log, verbose=args.verbose, started=started)
            try:
                proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                print(f"fedshift simulate: timed out after {args.timeout} s", file=sys.stderr)
        status = run_status(flwr_home, env)
        # the stream can end a moment before the SuperLink records the run as finished
        deadline = time.time() + 30
        while status.startswith(("running", "pending", "starting")) and time.time() < deadline:
            time.sleep(1)
            status = run_status(flwr_home, env)
    finally:
        stop_local_superlink(flwr_home)
        shutil.rmtree(flwr_home, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    wall = time.time() - started
    metrics = out / "metrics.json"
    ok = status == "finished:completed" and metrics.is_file()
    print(f"\nflower run status: {status}; wall time {wall:.0f} s; log {log_path}")
    if ok:
        print(f"metrics: {metrics} and {out / 'metrics.csv'}; checkpoints: {out / 'checkpoints'}")
        return 0
    print("fedshift simulate: the run did not complete; see the log above and " + str(log_path), file=sys.stderr)
    return 1


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP: unwind through ``finally`` so the local SuperLink, its simulation
    process and Ray workers are stopped instead of orphaned."""
    raise SystemExit(128 + signum)


def _relay(stream: Any, log: Any, verbose: bool, started: float) -> None:
    """Copy Flower's stream to ``log``; show round progress and fedshift's tables.

    Flower prints each log record twice when streaming (coloured, then dated); the
    dated copy and its continuation lines are skipped.
    """
    dated = in_table = False
    for raw in stream:
        log.write(raw)
        line = raw.rstrip("\n")
        if _DATED.match(line):
            dated, in_table = True, False
            continue
        if _LOG_PREFIX.match(line):
            dated, in_table = False, False
            line = _LOG_PREFIX.sub("", line)
        elif dated:
            continue
        if verbose:
            print(line, flush=True)
            continue
        if m := re.search(r"\[ROUND (\d+)/(\d+)\]", line):
            print(f"[{time.time() - started:6.0f} s] round {m.group(1)}/{m.group(2)} …", flush=True)
        elif line.startswith("round ") and "ε is cumulative" in line:
            in_table = True
            print(line, flush=True)
        elif in_table or line.startswith("fedshift:") or "ERROR" in raw or "Traceback" in line:
            print(line, flush=True)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
            "stopped at the end. Exit status: 0 when Flower reports the run completed."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: 3 rounds × 8 DP steps, 64 tokens (≈10 min on 2 CPU cores); full: 10 × 40, 128 tokens")
    p.add_argument("--dataset", metavar="DIR", help="dataset folder (default: bundled data/amazon-art-office)")
    p.add_argument("--base-model", metavar="DIR", help="local BERT checkpoint (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--out", metavar="DIR", help="results folder (default: runs/<timestamp>)")
    p.add_argument("--rounds", type=int, help="server rounds (overrides the preset)")
    p.add_argument("--epsilon", type=float, help="total ε budget per silo for the whole run")
    p.add_argument("--seed", type=int, help="seed of the initial model, sampling and noise")
    p.add_argument("--no-dp", action="store_true", help="train without DP-SGD (a non-private baseline)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any [tool.flwr.app.config] key, e.g. --set local-steps=16 (repeatable)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds before the run is stopped (default 3600)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's whole log")
    p.set_defaults(func=simulate)
    return p
