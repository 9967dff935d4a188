"""A Flower deployment on one machine: real ``flower-superlink`` / ``flower-supernode`` / ``flwr``
processes on 127.0.0.1, over TLS, with SuperNode authentication and a SuperLink database.

:class:`LocalDeployment` owns every process it starts (each in its own session, so the
SuperNode's ClientApp subprocesses go with it) and stops exactly those, also when the
caller is interrupted. Each silo gets its own "disk" under ``DIR/silos/<silo>/``:

* ``data/<silo>/``   a copy of the silo's folder (events, users): the only private data
* ``state/``         the silo's privacy ledger (node config ``state-dir``)
* ``policy.toml``    the silo's privacy policy (node config ``policy``)
* ``<silo>.key/.pub`` its SuperNode key pair (``DIR/keys``), the public half registered

The app is submitted with ``flwr run`` through a private ``FLWR_HOME`` whose
``config.toml`` names this SuperLink and the CA certificate. :mod:`fedshift.deploy_cmd`
is the CLI over it; the fault tests drive it directly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import psutil

from fedshift.deploy_credentials import Certificates, SupernodeKey, write_certificates, write_supernode_keys
from fedshift.flower_processes import FLOWER_ENV, copy_app, free_port, relay, write_run_config
from shared_model.config import RunConfig
from shared_model.privacy.ledger_signatures import gather_public_keys
from shared_model.io_utils import toml_value, write_bytes_atomic

CONNECTION = "fedshift"
READY_SECONDS = 60.0


class DeploymentError(RuntimeError):
    """A deployment step failed (one-line message naming the step and its log)."""


def _flwr() -> str:
    return shutil.which("flwr") or "flwr"


@dataclass
class SiloDisk:
    """One silo's own folder in a local deployment."""

    name: str
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data" / self.name

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def policy(self) -> Path:
        return self.root / "policy.toml"

    @property
    def log(self) -> Path:
        return self.root / "supernode.log"


@dataclass
class LocalDeployment:
    """SuperLink + one SuperNode per silo under ``folder`` (see the module docstring)."""

    folder: Path
    dataset: Path
    silos: list[str]
    node_ids: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0
    resumed: bool = False  # resuming a run in ``folder``: a fresh SuperLink database, logs appended

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()
        self.dataset = Path(self.dataset).resolve()
        self.flwr_home = self.folder / "flwr-home"
        self.certs = Certificates(self.folder / "certs")
        self.database = self.folder / "superlink.db"
        if self.resumed:  # the keys stay; the new SuperLink registers them in a database of its own
            self.database = self.folder / f"superlink-resume-{time.strftime('%Y%m%d-%H%M%S')}.db"
        self.keys = {s: SupernodeKey(s, self.folder / "keys" / f"{s}.key", self.folder / "keys" / f"{s}.pub")
                     for s in self.silos}

    # ------------------------------------------------------------- set-up
    def disk(self, silo: str) -> SiloDisk:
        return SiloDisk(silo, self.folder / "silos" / silo)

    def env(self) -> dict[str, str]:
        return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.flwr_home)}

    def prepare(self, allow_non_private: bool = False) -> None:
        """Certificates, keys, each silo's disk (data copy, state folder, policy), and each
        silo's ledger public key gathered into ``OUT/silo-keys``."""
        if not self.certs.ca_cert.is_file():
            write_certificates(self.certs.folder)
        missing = [s for s in self.silos if not self.keys[s].private.is_file()]
        if missing:
            write_supernode_keys(self.folder / "keys", missing)
        for silo in self.silos:
            disk = self.disk(silo)
            if not disk.data.is_dir():
                shutil.copytree(self.dataset / "silos" / silo, disk.data)
            disk.state.mkdir(parents=True, exist_ok=True)
            write_policy(disk.policy, allow_non_private)
            # the silo's ledger-signing public key beside the run, for `fedshift audit OUT --silo-keys OUT/silo-keys`
            gather_public_keys(disk.state, [silo], self.folder / "silo-keys")

    def start_superlink(self) -> None:
        """TLS, SuperNode authentication, a database; then the CLI connection in FLWR_HOME."""
        self.port = free_port()
        log = self.folder / "superlink.log"
        start = log.stat().st_size if log.exists() else 0  # a resumed deployment appends to the old log
        self._spawn("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
            "--ssl-keyfile", str(self.certs.server_key), "--enable-supernode-auth",
            "--database", str(self.database), "--disable-runtime-dependency-installation",
        ], log)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.flwr_home / "config.toml", (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs.ca_cert}"\n').encode())
        self._wait_for(lambda: b"Uvicorn running" in log.read_bytes()[start:], "superlink", log)

    def register(self, silo: str) -> int:
        """``flwr supernode register`` the silo's public key; return its node id."""
        out = self._flwr_json(["supernode", "register", str(self.keys[silo].public), CONNECTION])
        self.node_ids[silo] = int(out["node-id"])
        return self.node_ids[silo]

    def node_config(self, silo: str) -> str:
        disk = self.disk(silo)
        values = {"silo-dir": str(disk.data), "state-dir": str(disk.state), "policy": str(disk.policy),
                  "catalogue-dir": str(self.dataset)}
        return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())

    def start_supernode(self, silo: str, *, key: Path | None = None, root_certificates: bool = True,
                        max_retries: int | None = None, name: str | None = None) -> subprocess.Popen:
        """One ``flower-supernode`` OS process for ``silo`` (its own key unless ``key`` is given)."""
        cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
               "--auth-supernode-private-key", str(key or self.keys[silo].private),
               "--node-config", self.node_config(silo)]
        if root_certificates:
            cmd += ["--root-certificates", str(self.certs.ca_cert)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        return self._spawn(name or f"supernode-{silo}", cmd, self.disk(silo).log if name is None
                           else self.folder / f"{name}.log")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process group of a process this deployment started."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop every process this deployment started and their descendants (SIGTERM, then
        SIGKILL), SuperNodes first. Descendants are collected first: Flower's SuperExec starts
        the ServerApp/ClientApp processes in sessions of their own."""
        family: list[psutil.Process] = []
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            proc = self.procs[name]
            try:
                family += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for child in family:
            try:
                child.terminate()
            except psutil.NoSuchProcess:
                pass
        deadline = time.time() + 15
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may hold children that outlived their leader
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        _, alive = psutil.wait_procs(family, timeout=max(0.1, deadline - time.time()))
        for child in alive:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.procs.clear()

    # ------------------------------------------------------------- the run
    def submit(self, cfg: RunConfig, stream: TextIO, verbose: bool = False) -> str:
        """``flwr run`` the app with ``cfg``, relaying the per-round table; return Flower's status."""
        config_file = self.folder / "run-config.toml"
        write_run_config(cfg.to_run_config(), config_file)
        started = time.time()
        app = self.folder / "app"  # the app's FAB files only: `flwr run` walks this, not the repository
        shutil.rmtree(app, ignore_errors=True)
        with open(self.folder / "flwr.log", "a" if self.resumed else "w", encoding="utf-8") as log, subprocess.Popen(
            [_flwr(), "run", str(copy_app(app)), CONNECTION, "--stream", "--run-config", str(config_file)],
            env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,
        ) as proc:
            self.procs["flwr-run"] = proc
            assert proc.stdout is not None
            relay(proc.stdout, log, verbose=verbose, started=started, stream=stream)
            proc.wait()
            self.procs.pop("flwr-run", None)
        return self.wait_finished()

    def wait_online(self, silos: list[str], seconds: float = READY_SECONDS) -> None:
        """Wait until the SuperLink lists these silos' SuperNodes as online (``flwr supernode ls``)."""
        deadline = time.time() + seconds
        wanted = {str(self.node_ids[s]) for s in silos}
        while time.time() < deadline:
            nodes = self._flwr_json(["supernode", "ls", CONNECTION]).get("nodes", [])
            if wanted <= {n.get("node-id") for n in nodes if n.get("status") == "online"}:
                return
            time.sleep(1)
        raise DeploymentError(f"SuperNodes of {', '.join(silos)} not online after {seconds:.0f} s; see their logs")

    def stop_run(self, run_id: int | str) -> None:
        """``flwr stop`` a run on this SuperLink (its ServerApp ends; the SuperNodes stay)."""
        self._flwr_json(["stop", str(run_id), CONNECTION])

    def run_status(self) -> str:
        """Status of the newest run on this SuperLink (``flwr ls``), e.g. ``finished:completed``."""
        runs = self._flwr_json(["ls", CONNECTION]).get("runs", [])
        if not runs:
            return "no run"
        return str(max(runs, key=lambda r: r.get("pending-at", "")).get("status"))

    def wait_finished(self, seconds: float = 30) -> str:
        status = self.run_status()
        deadline = time.time() + seconds
        while status.startswith(("running", "pending", "starting")) and time.time() < deadline:
            time.sleep(1)
            status = self.run_status()
        return status

    def write_manifest(self) -> None:
        """DIR/deployment.json: the SuperLink address and each silo's node id and disk."""
        manifest = {"superlink": f"127.0.0.1:{self.port}", "tls-ca": str(self.certs.ca_cert),
                    "supernode-auth": True, "database": str(self.database),
                    "silos": {s: {"node-id": self.node_ids.get(s), "disk": str(self.disk(s).root),
                                  "public-key": str(self.keys[s].public)} for s in self.silos}}
        write_bytes_atomic(self.folder / "deployment.json", json.dumps(manifest, indent=2).encode())

    # ------------------------------------------------------------- helpers
    def _spawn(self, name: str, cmd: list[str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.folder)
        self.procs[name] = proc
        return proc

    def _wait_for(self, ready, name: str, log: Path) -> None:
        deadline = time.time() + READY_SECONDS
        while time.time() < deadline:
            if self.procs[name].poll() is not None:
                raise DeploymentError(f"{name} exited with status {self.procs[name].returncode}; see {log}")
            if ready():
                return
            time.sleep(0.3)
        raise DeploymentError(f"{name} not ready after {READY_SECONDS:.0f} s; see {log}")

    def _flwr_json(self, args: list[str]) -> dict:
        out = subprocess.run([_flwr(), *args, "--format", "json"], env=self.env(), capture_output=True,
                             text=True, timeout=120, check=False)
        try:
            data = json.loads(out.stdout)
        except json.JSONDecodeError:
            data = {}
        if not data.get("success"):
            detail = (data.get("error-message") or out.stdout or out.stderr).strip().splitlines()
            raise DeploymentError(f"flwr {' '.join(args[:2])} failed: {detail[-1] if detail else out.returncode}")
        return data


def write_policy(path: Path, allow_non_private: bool) -> None:
    """The silo's default policy file (shared_model.privacy.policy), unless one exists."""
    if path.exists():
        return
    try:
        from shared_model.privacy.policy import write_default_policy
    except ImportError:  # the policy module has not landed on this branch yet
        return
    write_default_policy(path, allow_non_private=allow_non_private)
