"""Privacy ledger, restart, budget refusal and the audit (issue #5)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_client import client_app
from shared_model.adapters import to_arrays
from shared_model.config import RunConfig
from shared_model.model import build_model
from shared_model.privacy import accountants
from shared_model.privacy.audit_report import audit_run, write_report
from shared_model.privacy.ledger import Ledger, LedgerError, record_hash
from shared_model.privacy.one_run import epsilon_lower_bound
from shared_model.privacy.records import DpSgdRound, Refusal, write_record


def epsilon_of_history(accountant: str, history: list, delta: float) -> float:
    return accountants.create(accountant).epsilon(history, delta)


def test_lower_bound_matches_hand_computed_case() -> None:
    # all r guesses correct: P[Bin(r,p) ≥ r] = p^r = 0.05 → p = 0.05^(1/r), ε = log(p/(1-p))
    for r in (5, 10, 20):
        p = 0.05 ** (1 / r)
        assert epsilon_lower_bound(r, r) == pytest.approx(math.log(p / (1 - p)), abs=1e-9)
    assert epsilon_lower_bound(10, 10) == pytest.approx(1.0519, abs=1e-4)
    assert epsilon_lower_bound(20, 10) == 0.0  # chance level proves nothing


def test_ledger_detects_corrupt_tail_and_edits(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.jsonl")
    led.append({"round": 1, "x": 1.0})
    led.append({"round": 2, "x": 2.0})
    assert [r["round"] for r in led.read()] == [1, 2]
    raw = led.path.read_bytes()
    led.path.write_bytes(raw[:-7])
    with pytest.raises(LedgerError, match=r"ledger.jsonl:2: truncated"):
        led.read()
    led.path.write_bytes(raw.replace(b'"x":2.0', b'"x":3.0'))
    with pytest.raises(LedgerError, match=r"ledger.jsonl:2: checksum mismatch"):
        led.read()


def _train(cfg: RunConfig, node_config: dict, rnd: int, context: Context, num_categories: int) -> Message:
    model = build_model(cfg, num_categories=num_categories)
    msg = Message(content=RecordDict({"arrays": to_arrays(model), "config": ConfigRecord({"server-round": rnd})}),
                  dst_node_id=7, message_type="train")
    return client_app.train(msg, context)


@pytest.fixture()
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 7), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.mark.slow  # trains with Opacus
def test_restart_continues_epsilon_and_budget_refuses(
    small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path, task_identity: None
) -> None:
    from fl_client.task import open_silo
    from fl_server.transitions import platform_candidates, query_content

    cfg = RunConfig.from_run_config({"dataset": str(small_dataset), "base-model": str(tiny_bert), "local-steps": 2,
                                     "batch-size": 16, "num-server-rounds": 2, "epsilon": 2.0,
                                     # a small transition share: DP-SGD's σ stays small enough that a round past
                                     # the plan overruns the budget (with 0.6 it fits in the calibration's slack)
                                     "transition-epsilon-share": 0.1})
    node = {"partition-id": 0, "state-dir": str(tmp_path / "state")}  # the silo's own state root
    ncat = len(open_silo(cfg, node).categories)
    ctx = Context(run_id=11, node_id=7, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    # the popularity and transition releases (popularity-prior, transitions: the defaults) come first, then round 1
    released = client_app.popularity(Message(content=RecordDict({"config": ConfigRecord({"server-round": 0})}),
                                             dst_node_id=7, message_type="query.popularity"), ctx)
    z = float(released.content["ledger"]["noise-multiplier"])
    data = open_silo(cfg, node)
    query = query_content([data.platform], platform_candidates(cfg, data.catalogue, data.items))
    pairs = client_app.transitions(Message(content=query, dst_node_id=7, message_type="query.transitions"), ctx)
    zt = float(pairs.content["ledger"]["noise-multiplier"])
    r1 = _train(cfg, node, 1, ctx, ncat)
    eps1 = float(r1.content["metrics"]["epsilon"])
    # the silo process restarts: a fresh Context, no in-memory state; the ledger restores both kinds
    ctx2 = Context(run_id=11, node_id=7, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    r2 = _train(cfg, node, 2, ctx2, ncat)
    rec = dict(r2.content["ledger"])
    sigma, q = rec["noise-multiplier"], rec["sample-rate"]
    assert float(r2.content["metrics"]["epsilon"]) == pytest.approx(
        epsilon_of_history("rdp", [(z, 1.0, 1), (zt, 1.0, 1)] + [(sigma, q, 2)] * 2, 1e-5))
    assert float(r2.content["metrics"]["epsilon"]) > eps1 > 0
    # the planned rounds spent the budget: a third round is refused, explicitly
    r3 = _train(cfg, node, 3, ctx2, ncat)
    assert r3.content["metrics"]["budget-exhausted"] == 1
    assert r3.content["status"]["status"] == "budget-exhausted"
    refusal = r3.content["ledger"]  # the refusal is recorded on the silo's ledger and sent to the server
    assert refusal["kind"] == "refusal" and refusal["rule"] == "run-budget" and refusal["round"] == 3
    assert refusal["reason"] == r3.content["status"]["reason"] and refusal["epsilon-requested"] > 2.0
    on_ledger = Ledger(tmp_path / "state" / "p0-r0" / "ledger.jsonl").read()
    assert [(r["kind"], r["round"]) for r in on_ledger] == [("popularity-release", 0), ("transition-release", 0),
                                                            ("dp-sgd-round", 1), ("dp-sgd-round", 2), ("refusal", 3)]
    records = on_ledger[2:4]
    assert records[-1]["epsilon-cumulative"] <= 2.0
    # a restart after the refusal: the refusal spends nothing, ε is the two rounds'
    ctx4 = Context(run_id=11, node_id=7, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    r3b = _train(cfg, node, 3, ctx4, ncat)
    assert r3b.content["ledger"]["epsilon-cumulative"] == pytest.approx(records[-1]["epsilon-cumulative"])
    # a new run on the same silo starts a new entry; lifetime spend covers both runs
    ctx3 = Context(run_id=12, node_id=7, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    r4 = _train(cfg, node, 1, ctx3, ncat)
    assert float(r4.content["metrics"]["epsilon"]) == pytest.approx(epsilon_of_history("rdp", [(sigma, q, 2)], 1e-5))
    assert float(r4.content["metrics"]["epsilon"]) < eps1  # run 12 released no item or transition counts
    assert r4.content["ledger"]["runs-on-ledger"] == 2  # runs that spent ε; refusals do not count
    assert r4.content["ledger"]["epsilon-lifetime"] > records[-1]["epsilon-cumulative"]


def test_strategy_ends_run_when_every_silo_is_exhausted(tmp_path: Path) -> None:
    from flwr.app import ArrayRecord

    from fl_server.records import RunRecords
    from fl_server.strategy import RecordingFedAvg

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

        def send_and_receive(self, messages: object, timeout: float) -> list:
            raise AssertionError("no message may be sent once every budget is exhausted")

    strategy = RecordingFedAvg(RunRecords(tmp_path, {}))
    strategy.exhausted = {1, 2}
    result = strategy.start(grid=Grid(), initial_arrays=ArrayRecord(), num_rounds=3)  # type: ignore[arg-type]
    assert strategy.ended_early == 1
    # no round ran: no global model came back and no round's metrics were recorded
    assert len(result.arrays) == 0 and result.train_metrics_clientapp == {} and result.evaluate_metrics_clientapp == {}
    assert strategy.records.records == []


def _fake_run(tmp_path: Path) -> Path:
    """A run folder of 2 silos × 2 rounds: ledger.jsonl and the metrics.json train rows that match it."""
    run = tmp_path / "run"
    run.mkdir()
    led = Ledger(run / "ledger.jsonl")
    rows = []
    for silo, sigma in (("a", 1.2), ("b", 1.5)):
        hist = []
        for rnd in (1, 2):
            hist.append((sigma, 0.25, 8))
            eps = epsilon_of_history("rdp", hist, 1e-5)
            write_record(led, DpSgdRound(run_id="5", silo=silo, round=rnd, steps=8, sample_rate=0.25,
                                         noise_multiplier=sigma, max_grad_norm=1.0, delta=1e-5, accountant="rdp",
                                         epsilon_round=0.0, epsilon_cumulative=eps, epsilon_budget=20.0))
            rows.append({"round": rnd, "phase": "train", "silo": silo, "node-id": 1, "steps": 8, "epsilon": eps,
                         "delta": 1e-5, "noise-multiplier": sigma, "sample-rate": 0.25})
    (run / "metrics.json").write_text(json.dumps({"run": {"run-id": 5, "dp": True, "config": {}}, "records": rows},
                                                 indent=2))
    return run


def test_audit_passes_then_corrupt_ledger_fails(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    result = audit_run(run)
    assert result["passed"], result["checks"]
    assert result["refusals"] == []
    cs = result["cross-silo"]["epsilon-user-on-every-silo-opacus-rdp"]
    assert cs > max(s["epsilon-reported"] for s in result["silos"].values())
    write_report(run, result)
    assert (run / "audit.md").is_file() and (run / "audit-epsilon.png").stat().st_size > 1000
    # a forger edits σ in one record and even re-hashes the chain: recomputation fails
    lines = (run / "ledger.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    recs[1]["noise-multiplier"] = 2.5
    prev = "0" * 64
    for r in recs:
        r["prev-sha256"] = prev
        r["sha256"] = record_hash(r)
        prev = r["sha256"]
    (run / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    bad = audit_run(run)
    assert not bad["passed"]
    failed = {c["check"]: c["detail"] for c in bad["checks"] if not c["passed"]}
    assert list(failed) == ["recompute-opacus:a", "rounds-on-ledger"]
    assert "worst: ledger.jsonl:2 (round 2)" in failed["recompute-opacus:a"]
    assert failed["rounds-on-ledger"].endswith("noise-multiplier 1.2 but ledger.jsonl:2 records 2.5")
    # without re-hashing, the integrity check names the line
    recs[2]["epsilon-cumulative"] = 0.1
    (run / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    worse = audit_run(run)
    assert any(c["check"] == "ledger-integrity" and "ledger.jsonl:3" in c["detail"] for c in worse["checks"])


CANARY = {"num-server-rounds": 5, "local-steps": 20, "batch-size": 128, "learning-rate": 0.03, "epsilon": 0.5,
          "num-negatives": 63, "max-eval-users": 0}


@pytest.mark.slow
@pytest.mark.parametrize("broken", [True, False])
def test_canary_audit_fails_on_broken_noise_and_passes_when_honest(
    small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path, broken: bool
) -> None:
    from fl_client.canary_audit import run_canary_audit

    cfg = RunConfig.from_run_config({"dataset": str(small_dataset), "base-model": str(tiny_bert), **CANARY,
                                     "audit-broken-noise": broken})
    res = run_canary_audit(cfg, 60, tmp_path, seed=0)
    print(f"canary audit broken={broken}: M={res.m} guesses={res.guesses} correct={res.correct} "
          f"lb={res.epsilon_lower_bound:.4f} ledger ε={res.ledger_epsilon:.4f}")
    assert 0 < res.ledger_epsilon <= 0.5
    assert res.passed is (not broken)
    if broken:
        assert res.epsilon_lower_bound > res.ledger_epsilon


def test_audit_lists_refusals_and_ignores_them_for_epsilon(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    before = audit_run(run)
    write_record(Ledger(run / "ledger.jsonl"), Refusal(
        run_id="5", silo="a", round=3, rule="run-budget", reason="8 more steps would exceed the budget", steps=8,
        sample_rate=0.25, noise_multiplier=1.2, delta=1e-5, accountant="rdp", epsilon_cumulative=1.0,
        epsilon_requested=30.0, epsilon_limit=20.0, epsilon_budget=20.0))
    doc = json.loads((run / "metrics.json").read_text())  # the server's row of the declined round
    doc["records"].append({"round": 3, "phase": "train", "silo": "a", "node-id": 1, "budget-exhausted": 1})
    (run / "metrics.json").write_text(json.dumps(doc, indent=2))
    after = audit_run(run)
    assert after["passed"] and after["silos"] == before["silos"] and after["cross-silo"] == before["cross-silo"]
    assert [(r["silo"], r["round"], r["rule"]) for r in after["refusals"]] == [("a", 3, "run-budget")]
    write_report(run, after)
    assert "## Refusals" in (run / "audit.md").read_text()


def test_server_forwards_silo_records_to_the_federation_ledger(tmp_path: Path) -> None:
    from fl_server.records import RunRecords
    from fl_server.strategy import RecordingFedAvg

    silo_line = write_record(Ledger(tmp_path / "silo.jsonl"), DpSgdRound(
        run_id="5", silo="a", round=1, steps=8, sample_rate=0.25, noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5,
        accountant="rdp", epsilon_round=0.1, epsilon_cumulative=0.1, epsilon_budget=8.0, time="t"))
    strategy = RecordingFedAvg(RunRecords(tmp_path, {}), ledger=Ledger(tmp_path / "ledger.jsonl"))
    strategy.append_ledger(ConfigRecord(silo_line), node_id=3)
    strategy.append_ledger(ConfigRecord({"kind": "no-such-kind", "run-id": "5"}), node_id=4)  # logged, not recorded
    (line,) = Ledger(tmp_path / "ledger.jsonl").read()
    assert line["silo-sha256"] == silo_line["sha256"] and line["node-id"] == 3
    assert {k: v for k, v in line.items() if k not in {"silo-sha256", "node-id", "sha256", "prev-sha256"}} == {
        k: v for k, v in silo_line.items() if k not in {"sha256", "prev-sha256"}}


def _cli_audit(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``fedshift audit FOLDER`` in this process (the CLI's own main): exit status, stdout, stderr."""
    from fedshift.cli import main

    code = main(["audit", str(folder)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_audit_truncated_metrics_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _fake_run(tmp_path)
    text = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(text[: len(text) // 2])
    code, out, err = _cli_audit(run, capsys)
    assert code == 2 and out == "", err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"fedshift audit: {run / 'metrics.json'}: the run's metrics is not valid JSON (line ")
    assert line.endswith("): truncated or garbled")
    (run / "metrics.json").write_text(json.dumps([1, 2]))
    assert _cli_audit(run, capsys)[1:] == ("", f'fedshift audit: {run / "metrics.json"}: no "run" object '
                                               "(not a fedshift metrics.json)\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _cli_audit(empty, capsys)
    assert code == 2 and "neither a run folder" in err and len(err.strip().splitlines()) == 1
