"""Faults of a real deployment on 127.0.0.1: flower-superlink (TLS, SuperNode authentication,
database) and one flower-supernode OS process per silo, from :class:`fedshift.deployment.LocalDeployment`.

One deployment is shared by the module (tiny BERT, the small generated dataset's 3 silos):
a SuperNode with an unregistered key and one without the CA certificate are refused; during a
3-round run one SuperNode is SIGKILLed mid-round (the round completes with the other two, the
run records the missing silo) and restarted (it rejoins; its ledger continues, ε neither reset
nor counted twice).
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
    dep = LocalDeployment(folder, small_dataset, list_silos(small_dataset))
    try:
        dep.prepare()
        dep.start_superlink()
        for silo in dep.silos:
            dep.register(silo)
            dep.start_supernode(silo)
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


def test_killed_supernode_is_missing_then_rejoins_with_its_ledger(deployment: LocalDeployment, small_dataset: Path,
                                                                  tiny_bert: Path) -> None:
    dep = deployment
    victim = dep.silos[-1]
    cfg = RunConfig().replace(**{
        "dataset": str(small_dataset), "base-model": str(tiny_bert), "out-dir": str(dep.folder / "run"),
        "num-server-rounds": 3, "local-steps": 2, "min-nodes": 2, "max-eval-users": 8,
        "release-metrics": "none"})  # ε of DP-SGD rounds only, so silos compare round by round
    result: dict[str, str] = {}
    runner = threading.Thread(target=lambda: result.setdefault("status", dep.submit(cfg, io.StringIO())))
    runner.start()
    log, victim_log = dep.folder / "flwr.log", dep.disk(victim).log
    deadline = time.time() + 900

    def wait_for(path: Path, text: str, count: int = 1) -> None:
        while (path.read_text(errors="replace").count(text) if path.exists() else 0) < count:
            assert time.time() < deadline and runner.is_alive(), f"{text!r} never appeared in {path}"
            time.sleep(0.3)

    wait_for(victim_log, "Receiving: train message")  # round 1 has reached the victim's node
    dep.kill(f"supernode-{victim}", signal.SIGKILL)  # mid-round: before it can reply
    wait_for(log, "aggregate_train")  # round 1 completed without it
    dep.start_supernode(victim)  # same key, same disk: it rejoins
    runner.join(timeout=max(1, deadline - time.time()))
    assert result.get("status") == "finished:completed", result

    metrics = json.loads((dep.folder / "run" / "metrics.json").read_text())
    missing = metrics["run"].get("missing", [])
    assert missing and missing[0]["round"] == 1 and missing[0]["silos"] == [victim], missing
    trained = {(r["round"], r["silo"]) for r in metrics["records"] if r["phase"] == "train"}
    assert {(1, s) for s in dep.silos[:-1]} <= trained and (1, victim) not in trained

    mine = _ledger_rounds(dep, victim)
    other = _ledger_rounds(dep, dep.silos[0])
    assert [r.round for r in mine] == sorted({r.round for r in mine})  # no round counted twice
    assert {r.round for r in mine} >= {3} and 1 not in {r.round for r in mine}
    assert len({r.run_id for r in mine}) == 1
    cumulative = [r.epsilon_cumulative for r in mine]
    assert all(b > a for a, b in zip(cumulative, cumulative[1:]))  # continues, never reset
    # ε after k rounds is the same function of (σ, q, steps) for every silo with the same q
    if mine[0].sample_rate == other[0].sample_rate:
        by_round = {r.round: r.epsilon_cumulative for r in other}
        assert cumulative[-1] == pytest.approx(by_round[len(mine)], rel=1e-9)
