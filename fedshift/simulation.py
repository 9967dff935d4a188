"""The typed Python simulate API: :func:`run_simulation` runs the Flower app on a
:class:`~shared_model.config.RunConfig` as a local simulation, one SuperNode per silo.

It is ``flwr run`` on this project with a private, temporary ``FLWR_HOME``: the same
ServerApp, ClientApp and ``[tool.flwr.app.config]`` keys as ``flwr run .``. Before launching,
it embeds the public catalogue once (cached), so silos start training at once. Afterwards
it reads Flower's status of the run (``finished:completed`` when it completed) and stops
the local SuperLink it started, so no background process is left behind. ``fedshift
simulate`` (:mod:`fedshift.simulate_cmd`) and ``fedshift experiment`` both call it.

The simulated silos' side (:func:`prepare_silo_state`): their state root is
``OUT/silo-state`` (or ``state_dir``), passed as ``$FEDSHIFT_STATE`` to the processes it
starts (the run config cannot name it); there each silo gets a default privacy policy
(``allow_non_private`` for ``--no-dp``) unless it already has one, and a secret derived from
the local ``silo_seed`` (fresh random when None), never from the server's run config.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import psutil

from fedshift.flower_processes import (FLOWER_ENV, copy_app, free_port, relay, terminate,
                                       write_run_config)
from shared_model.config import RunConfig
from shared_model.io_utils import toml_value, write_bytes_atomic

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
            terminate_then_kill(family, timeout=10)
            stopped += len(family)
    return stopped


def terminate_then_kill(procs: list[psutil.Process], timeout: float) -> None:
    """SIGTERM every process, wait up to ``timeout`` seconds, SIGKILL those still alive; a
    process that is already gone is skipped."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


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


def prepare_item_index(cfg: RunConfig, progress: bool = True) -> None:
    """Embed the public catalogue once in this process (cached for every silo)."""
    from shared_model.dataset import read_catalogue
    from shared_model.item_index import build_item_index

    build_item_index(read_catalogue(cfg.dataset_dir()), cfg.base_model or None, cfg.max_item_tokens, progress=progress)


@dataclass(frozen=True)
class SimulationResult:
    """How a simulation ended: Flower's status of the run, and where its outputs are."""

    status: str  # e.g. "finished:completed"
    seconds: float
    out: Path
    timed_out: bool = False

    @property
    def log(self) -> Path:
        return self.out / "flwr.log"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.json"

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed" and self.metrics.is_file()


def simulation_config(cfg: RunConfig, out: Path) -> RunConfig:
    """``cfg`` as a simulation into ``out`` runs it: ``out-dir`` = OUT."""
    return cfg.replace(**{"out-dir": str(out)})


def prepare_silo_state(state_dir: Path, silos: list[str], *, allow_non_private: bool = False,
                       silo_seed: int | str | None = None) -> None:
    """Each simulated silo's own side under ``state_dir``: a default policy (an existing one
    is kept) and a secret from ``silo_seed`` (an existing secret is kept). An existing policy
    that cannot be read raises :class:`~shared_model.privacy.policy.PolicyError` (a
    ``ValueError``: ``fedshift simulate`` exits 2 with its one line) before anything starts."""
    from shared_model.privacy.policy import POLICY_NAME, load_policy, write_default_policy
    from shared_model.privacy.silo_secret import secret_from_seed, secret_path, write_secret

    seed = secrets.token_hex(16) if silo_seed is None else silo_seed
    for silo in silos:
        load_policy(write_default_policy(state_dir / silo / POLICY_NAME, allow_non_private=allow_non_private))
        write_secret(secret_path(state_dir, silo), secret_from_seed(seed, silo))


SETUP_FILE = "simulation.json"  # OUT/simulation.json: where the simulated silos' state is (no secret)


def recorded_state_dir(out: Path, asked: Path | None = None) -> Path | None:
    """The silo state folder a run in ``out`` used (``OUT/simulation.json``), for ``--resume``;
    ``asked`` (``--state-dir``) must be it (``ValueError`` otherwise)."""
    setup = Path(out) / SETUP_FILE
    recorded = Path(json.loads(setup.read_text())["state-dir"]) if setup.is_file() else None
    asked = Path(asked).expanduser().resolve() if asked else None
    if asked and recorded and asked != recorded:
        raise ValueError(f"{setup}: --state-dir {asked} conflicts with the run's silo state folder {recorded}")
    return asked or recorded


def _simulation_fields() -> dict[str, Any]:
    """Flower's simulation settings: dashed key → protobuf field (``SimulationConfig``)."""
    from flwr.proto.federation_config_pb2 import SimulationConfig

    return {f.name.replace("_", "-"): f for f in SimulationConfig.DESCRIPTOR.fields}


def parse_federation_items(items: list[str]) -> dict[str, Any]:
    """``["KEY=VALUE", …]`` (``--federation-config``) → typed values by Flower's field types;
    ``ValueError`` with one line for an unknown key or a value of the wrong type."""
    fields = _simulation_fields()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = (x.strip() for x in item.partition("="))
        if not sep or key not in fields:
            raise ValueError(f"--federation-config {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        kind = fields[key].cpp_type
        try:
            if kind == fields[key].CPPTYPE_BOOL:
                if raw.lower() not in {"true", "false"}:
                    raise ValueError
                out[key] = raw.lower() == "true"
            elif kind in (fields[key].CPPTYPE_FLOAT, fields[key].CPPTYPE_DOUBLE):
                out[key] = float(raw)
            elif kind == fields[key].CPPTYPE_STRING:
                out[key] = raw.strip("'\"")
            else:
                out[key] = int(raw)
        except ValueError:
            raise ValueError(f"--federation-config {item!r}: {raw!r} is not a valid {key}") from None
    return out


def federation_config(silos: int, federation: dict[str, Any] | None = None, ray_address: str | None = None) -> str:
    """The ``flwr run --federation-config`` value: one virtual SuperNode per silo plus Flower's
    own simulation keys (``client-resources-num-cpus``, ``init-args-num-cpus``, …; the fields of
    its ``SimulationConfig``). ``ValueError`` for an unknown key, or for ``init-args-num-*`` with
    ``ray_address`` (Ray refuses resources when joining an existing cluster)."""
    if ray_address is not None and not _is_ray_address(ray_address):
        raise ValueError(f"--ray-address {ray_address!r}: expected HOST:PORT of a running Ray head "
                         "(e.g. 127.0.0.1:6379) or auto")
    keys = {"num-supernodes": silos, **(federation or {})}
    known = set(_simulation_fields())
    if unknown := sorted(set(keys) - known):
        raise ValueError(f"federation config: unknown key(s) {', '.join(unknown)}; Flower's are {', '.join(sorted(known))}")
    if ray_address and (given := sorted(k for k in keys if k.startswith("init-args-num-"))):
        raise ValueError(f"federation config: {', '.join(given)} cannot be set when joining the Ray cluster at "
                         f"{ray_address} (the cluster's nodes declare their own resources)")
    return " ".join(f"{k}={toml_value(v)}" for k, v in keys.items())


def _is_ray_address(address: str) -> bool:
    """``auto`` (Ray's own lookup of a running cluster) or ``HOST:PORT`` with a port in 1–65535."""
    if address == "auto":
        return True
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def run_simulation(cfg: RunConfig, out: Path, *, verbose: bool = False, timeout: float | None = None,
                   stream: TextIO | None = None, state_dir: Path | None = None, allow_non_private: bool = False,
                   silo_seed: int | str | None = None, federation: dict[str, Any] | None = None,
                   ray_address: str | None = None, check_data: bool = True) -> SimulationResult:
    """Run the Flower app on ``cfg`` as a local simulation, one SuperNode per silo of
    ``cfg.dataset``, writing into ``out``; return Flower's final status.

    ``cfg`` is the whole run config (every key of ``[tool.flwr.app.config]`` is passed to
    ``flwr run``), except ``out-dir`` (:func:`simulation_config`). The silos keep their
    ledgers, policies and secrets in ``state_dir`` (default OUT/silo-state, so ``fedshift
    audit OUT`` finds them; a stable folder accumulates lifetime spend across runs), made
    ready by :func:`prepare_silo_state` with ``allow_non_private`` and ``silo_seed``.
    Raises ``ValueError`` before ``out`` is created when the dataset has no silos or
    ``min-nodes`` exceeds them (the server would wait forever), and ``DataError`` (every
    ``file:line: field: reason``) when a file of the dataset is bad: a silo would otherwise
    fail its rounds one by one (``check_data=False``: the caller has validated these very
    files, as ``fedshift experiment`` does once for all its runs). ``flwr run`` gets a copy of the app's FAB files in a private
    FLWR_HOME (:func:`fedshift.flower_processes.copy_app`). Progress goes to ``stream``
    (default stdout); Flower's whole log to OUT/flwr.log. After ``timeout`` seconds the run
    is stopped. The local SuperLink is stopped at the end, also on SIGTERM/SIGHUP.

    ``federation`` adds Flower's simulation keys (:func:`federation_config`), e.g.
    ``{"client-resources-num-cpus": 1}`` for one Ray actor per CPU. ``ray_address``
    (``HOST:PORT`` of a running Ray head) makes Flower's Ray backend join that cluster
    instead of starting a local Ray: it is ``RAY_ADDRESS`` for the simulation process, which
    ``ray.init()`` in Flower's backend reads. The cluster's workers get only ``PYTHONPATH``
    from Flower, so its nodes must be started with fedshift's environment (docs/performance.md).
    """
    from shared_model.dataset import list_silos, require_valid_dataset
    from shared_model.privacy.ledger_signatures import gather_public_keys

    stream = stream or sys.stdout
    out = Path(out).expanduser().resolve()
    cfg = simulation_config(cfg, out)
    dataset = cfg.dataset_dir()
    silos = list_silos(dataset)
    if not silos:
        raise ValueError(f"{dataset}: no silos (expected silos/<name>/events.csv)")
    if cfg.min_nodes > len(silos):
        raise ValueError(f"min-nodes = {cfg.min_nodes} but {dataset} has {len(silos)} silos: no round would start")
    if check_data:
        require_valid_dataset(dataset, silos)
    federation_arg = federation_config(len(silos), federation, ray_address)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = Path(state_dir).expanduser().resolve() if state_dir else out / "silo-state"
    prepare_silo_state(state_dir, silos, allow_non_private=allow_non_private, silo_seed=silo_seed)
    gather_public_keys(state_dir, silos, out / "silo-keys")  # the silos' ledger-signing keys, for `audit --silo-keys`
    write_bytes_atomic(out / SETUP_FILE, json.dumps({"state-dir": str(state_dir)}, indent=2).encode())
    privacy = (f"ε={cfg.epsilon:g} per silo, δ={cfg.delta:g}, accountant {cfg.accountant}" if cfg.dp
               else "no DP (non-private)")
    print(f"{len(silos)} silos ({', '.join(silos)}), {cfg.num_server_rounds} rounds × {cfg.local_steps} local "
          f"steps, {privacy}", file=stream, flush=True)
    print(f"results: {out}", file=stream, flush=True)
    prepare_item_index(cfg, progress=stream is sys.stdout)

    flwr_home = Path(tempfile.mkdtemp(prefix="fedshift-flwr-"))
    env = {**local_superlink_env(flwr_home), "FEDSHIFT_STATE": str(state_dir)}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    config_file = flwr_home / "run-config.toml"
    write_run_config(cfg.to_run_config(), config_file)
    cmd = [
        shutil.which("flwr") or "flwr", "run", str(copy_app(flwr_home / "app")), "--stream",
        "--run-config", str(config_file),
        "--federation-config", federation_arg,
    ]
    started = time.time()
    status = "not started"
    timed_out = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGHUP)} if in_main else {}
    try:
        with open(out / "flwr.log", "a" if cfg.resume_run_id else "w", encoding="utf-8") as log, subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            assert proc.stdout is not None

            def stop() -> None:
                timed_out.set()
                proc.kill()

            timer = threading.Timer(timeout, stop) if timeout else None
            if timer:
                timer.daemon = True
                timer.start()
            try:
                relay(proc.stdout, log, verbose=verbose, started=started, stream=stream)
                proc.wait()
            except BaseException:  # interrupted (Ctrl-C): `flwr run` goes too, not only the SuperLink
                proc.kill()
                raise
            finally:
                if timer:
                    timer.cancel()
        if timed_out.is_set():
            print(f"fedshift simulate: timed out after {timeout:g} s", file=stream, flush=True)
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
    result = SimulationResult(status, time.time() - started, out, timed_out.is_set())
    print(f"\nflower run status: {status}; wall time {result.seconds:.0f} s; log {result.log}", file=stream, flush=True)
    if result.ok:
        print(f"metrics: {result.metrics} and {out / 'metrics.csv'}; checkpoints: {out / 'checkpoints'}",
              file=stream, flush=True)
    return result
