"""Beyond one machine: `fedshift simulate --ray-address` runs the silos on an existing Ray
cluster through Flower's Ray backend. The test starts a Ray head on 127.0.0.1 (`ray start
--head`, its own temp dir so no other simulation on this machine finds it), runs a tiny
simulation against it, checks from the cluster's own records that the run's driver and its
ClientApp actors lived there, and stops the head's processes.

`ray stop` is not used: it stops every Ray process of the user on the machine, including
other simulations'. The head's processes are found by its temp dir and by a tag in their
environment (Ray workers inherit the raylet's), and stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from fedshift.flower_processes import FLOWER_ENV, free_port
from fedshift.simulation import terminate_then_kill

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_TAG = "FEDSHIFT_TEST_RAY_HEAD"


def _head_processes(temp: Path, tag: str) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            mine = str(temp) in " ".join(proc.info.get("cmdline") or []) or proc.environ().get(HEAD_TAG) == tag
            if mine:
                for p in [proc, *proc.children(recursive=True)]:
                    found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_head(temp: Path, tag: str) -> int:
    """Terminate (then kill) every process of the head started in ``temp``; return how many."""
    procs = _head_processes(temp, tag)
    terminate_then_kill(procs, timeout=15)
    return len(procs)


@contextmanager
def ray_head(env: dict[str, str], num_cpus: int = 2) -> Iterator[tuple[str, Path]]:
    """A Ray head on 127.0.0.1 with its own temp dir and free ports; yields (address, temp dir)."""
    temp = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    tag = uuid.uuid4().hex
    port = free_port()
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", str(num_cpus), "--temp-dir", str(temp), "--include-dashboard", "false",
           "--disable-usage-stats", "--object-store-memory", str(200 * 1024 ** 2)]
    for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port"):  # fixed defaults otherwise
        cmd += [flag, str(free_port())]
    try:
        for _ in range(2):  # Ray gives the raylet a fixed 30 s to register; a loaded machine can miss it
            started = subprocess.run(cmd, env={**env, HEAD_TAG: tag}, capture_output=True, text=True, timeout=180)
            if started.returncode == 0 or "timed out during startup" not in started.stderr + started.stdout:
                break
            stop_head(temp, tag)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield f"127.0.0.1:{port}", temp
    finally:
        stop_head(temp, tag)
        shutil.rmtree(temp, ignore_errors=True)
        assert not _head_processes(temp, tag), "Ray head processes left running"


def cluster_jobs(address: str, env: dict[str, str]) -> list[dict]:
    """The cluster's job table (from its GCS), read by a short driver of its own."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "from ray._private.state import state; "
            "print(json.dumps([{'job': j['JobID'], 'entrypoint': j.get('Entrypoint', ''), "
            "'driver_pid': j.get('DriverPid'), 'dead': j.get('IsDead')} for j in ray._private.state.jobs()]))"
            ) % address
    out = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in env.items() if k != "RAY_ADDRESS"},
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_simulation_runs_on_an_existing_ray_cluster(tmp_path: Path, small_dataset: Path, tiny_bert: Path,
                                                   cache_dir: Path) -> None:
    state = tmp_path / "silo-state"
    out = tmp_path / "run"
    # The cluster's workers get the environment of `ray start` (Flower passes them only PYTHONPATH),
    # so the head is started with fedshift's: the silos' state root, the cache, offline models.
    env = {**os.environ, **FLOWER_ENV, "FEDSHIFT_STATE": str(state), "FEDSHIFT_CACHE": str(cache_dir),
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                     os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("RAY_ADDRESS", None)
    with ray_head(env) as (address, temp):
        cmd = [sys.executable, "-m", "fedshift.cli", "simulate", "--out", str(out), "--dataset", str(small_dataset),
               "--base-model", str(tiny_bert), "--rounds", "1", "--state-dir", str(state), "--silo-seed", "1",
               "--set", "local-steps=1", "--set", "batch-size=16", "--set", "max-eval-users=8",
               "--ray-address", address, "--federation-config", "client-resources-num-cpus=1"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "finished:completed" in proc.stdout
        jobs = cluster_jobs(address, env)
        sim_jobs = [j for j in jobs if "flwr-simulation" in j["entrypoint"]]
        assert sim_jobs, jobs  # the simulation process was a driver of this cluster …
        logs = temp / "session_latest" / "logs"
        actor_logs = [f for f in logs.glob("worker-*.out") if "ClientAppActor" in f.read_text(errors="replace")]
        assert actor_logs, sorted(p.name for p in logs.iterdir())  # … and its ClientApp actors ran on its workers
    doc = json.loads((out / "metrics.json").read_text())
    trained = {s for r in doc["rounds"] if r["round"] == 1 for s in r["silos"] if s != "ALL"}
    assert trained == {"p0-r0", "p1-r0", "p2-r0"}
    assert all((state / s / "ledger.jsonl").is_file() for s in trained)  # the workers saw FEDSHIFT_STATE
