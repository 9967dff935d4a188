"""Faults of a real deployment on 127.0.0.1: flower-superlink (TLS, SuperNode authentication,
database) and one flower-supernode OS process per silo, from :class:`fedshift.deployment.LocalDeployment`.

One deployment is shared by the module (tiny BERT, 2 of the small generated dataset's silos):
a SuperNode with an unregistered key and one without the CA certificate are refused; during a
3-round run one SuperNode is SIGKILLed mid-round 2 (the round completes with the other one,
the run records the missing silo) and restarted (it rejoins for round 3; its ledger
continues, ε neither reset nor counted twice). ``--resume`` is tested on ``fedshift simulate``
(tests/test_resume.py): ``deploy local --resume`` runs the same ServerApp/ClientApp code
(run config ``resume-run-id``), its own glue is tested there without processes.

Time goes mostly to Flower itself: each message starts a ClientApp process per silo (torch,
transformers and peft imported each time), and a SIGKILLed SuperNode is declared offline only
after 2 missed heartbeats (flwr 1.42's SuperNode sends one every ~24 s; the interval is not
configurable), so its pending round ends 36-60 s after the kill.
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from pathlib import Path

import pytest

from fedshift.deploy_credentials import write_supernode_keys
from fedshift.deployment import LocalDeployment
from shared_model.config import RunConfig
from shared_model.dataset import list_silos
from shared_model.privacy.ledger import Ledger
from shared_model.privacy.records import dp_rounds, read_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, small_dataset: Path, tiny_bert: Path):
    folder = tmp_path_factory.mktemp("deploy")
    dep = LocalDeployment(folder, small_dataset, list_silos(small_dataset)[:2])  # 2 of 3 silos: cheaper
    try:
        dep.prepare()
        dep.start_superlink()
        for silo in dep.silos:
            dep.register(silo)
            dep.start_supernode(silo)
        dep.wait_online(dep.silos)
        yield dep
    finally:
        dep.stop()
    for name, proc in dep.procs.items():  # every process it started has exited
        assert proc.poll() is not None, name


def _wait_exit(proc, seconds: float = 90) -> int:
    deadline = time.time() + seconds
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    return proc.poll()


def test_unregistered_key_and_missing_ca_are_refused(deployment: LocalDeployment) -> None:
    stranger = write_supernode_keys(deployment.folder / "stranger", ["x"])[0]
    silo = deployment.silos[0]
    unregistered = deployment.start_supernode(silo, key=stranger.private, max_retries=1, name="unregistered")
    no_ca = deployment.start_supernode(silo, root_certificates=False, max_retries=1, name="no-ca")
    assert _wait_exit(unregistered) not in (None, 0)
    assert _wait_exit(no_ca) not in (None, 0)
    assert "Failed to activate SuperNode" in (deployment.folder / "unregistered.log").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in (deployment.folder / "no-ca.log").read_text()


def _ledger_rounds(dep: LocalDeployment, silo: str) -> list:
    path = dep.disk(silo).state / silo / "ledger.jsonl"
    return dp_rounds(read_records(Ledger(path))) if path.exists() else []


def test_killed_supernode_is_missing_then_rejoins_with_its_ledger(deployment: LocalDeployment,
                                                                  small_dataset: Path, tiny_bert: Path) -> None:
    """One 2-round run: every silo makes its popularity release; in round 1 one SuperNode is
    SIGKILLed after it received its train message (the round completes with the other one,
    ``min-nodes`` = 1, and records the missing silo); once round 1's checkpoint exists it is
    restarted (same key, same disk) and rejoins the same SuperLink and run for round 2. Its new
    process has no node state: it restores the run's ε (the popularity release) from its own
    ledger, so after round 2 it has spent what the other silo spent by round 1, neither reset
    nor counted twice."""
    dep = deployment
    victim, other = dep.silos[-1], dep.silos[0]
    run_dir = dep.folder / "run"
    cfg = RunConfig().replace(**{
        "dataset": str(small_dataset), "base-model": str(tiny_bert), "out-dir": str(run_dir),
        "num-server-rounds": 2, "local-steps": 2, "batch-size": 16, "min-nodes": 1, "max-eval-users": 8,
        "release-metrics": "none"})  # ε of the popularity release and DP-SGD rounds only: silos compare exactly
    result: dict[str, str] = {}
    runner = threading.Thread(target=lambda: result.setdefault("status", dep.submit(cfg, io.StringIO())))
    runner.start()
    deadline = time.time() + 900

    def wait_for(ready, what: str) -> None:
        while not ready():
            assert time.time() < deadline and runner.is_alive(), f"{what} never happened"
            time.sleep(0.2)

    victim_log = dep.disk(victim).log
    wait_for(lambda: "Receiving: train message" in victim_log.read_text(errors="replace"),
             "round 1's train message reaching the victim")
    dep.kill(f"supernode-{victim}", signal.SIGKILL)  # mid-round: before it can reply
    wait_for(lambda: (run_dir / "checkpoints" / "round-001").is_dir(), "round 1 completing without the victim")
    dep.start_supernode(victim)  # same key, same disk: it rejoins
    runner.join(timeout=max(1, deadline - time.time()))
    assert result.get("status") == "finished:completed", result

    metrics = json.loads((run_dir / "metrics.json").read_text())
    missing = metrics["run"].get("missing", [])
    assert [(m["round"], m["silos"]) for m in missing] == [(1, [victim])], missing
    trained = {(r["round"], r["silo"]) for r in metrics["records"] if r["phase"] == "train"}
    # it rejoins during round 1's evaluation, before round 2 samples the nodes
    assert trained == {(n, s) for n in (1, 2) for s in dep.silos} - {(1, victim)}

    mine, theirs = _ledger_rounds(dep, victim), _ledger_rounds(dep, other)
    assert [r.round for r in mine] == [2] and [r.round for r in theirs] == [1, 2]  # none twice
    assert len({r.run_id for r in mine + theirs}) == 1
    restored = [line for line in victim_log.read_text(errors="replace").splitlines() if "restored run" in line]
    assert restored, "the victim's new process did not read its ledger"
    # ε after the release and one round is the same function of (σ, q, steps) for every silo
    # with the same q and release: the restarted silo neither lost the release (reset) nor
    # charged it again (twice)
    assert mine[0].sample_rate == theirs[0].sample_rate  # the fixture's silos are the same size
    assert mine[0].epsilon_cumulative == pytest.approx(theirs[0].epsilon_cumulative, rel=1e-9)
    assert mine[0].epsilon_cumulative < theirs[1].epsilon_cumulative
