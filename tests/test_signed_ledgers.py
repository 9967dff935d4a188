"""Signed ledgers: each silo signs its records with its own Ed25519 key, the server's gathered
copy keeps the signatures, and `fedshift audit --silo-keys` catches a record that was edited
and re-chained by hand (consistently enough that every other check still passes)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from fedshift.cli import main
from fl_server.records import RunRecords
from fl_server.strategy import RecordingFedAvg
from shared_model.privacy import accountants
from shared_model.privacy.audit_report import audit_run, signature_check
from shared_model.privacy.ledger import Ledger, record_hash
from shared_model.privacy.ledger_signatures import KEY_NAME, gather_public_keys, signature_problems, silo_signer
from shared_model.privacy.records import DpSgdRound, write_record

SIGMA = {"a": 1.2, "b": 1.5}


def _round(silo: str, rnd: int, sigma: float) -> DpSgdRound:
    eps = accountants.create("rdp").epsilon([(sigma, 0.25, 8)] * rnd, 1e-5)
    return DpSgdRound(run_id="5", silo=silo, round=rnd, steps=8, sample_rate=0.25, noise_multiplier=sigma,
                      max_grad_norm=1.0, delta=1e-5, accountant="rdp", epsilon_round=0.0,
                      epsilon_cumulative=eps, epsilon_budget=20.0)


def _run(tmp_path: Path, signed: bool = True) -> tuple[Path, Path]:
    """A run folder whose federation ledger the real strategy gathered from two silos' replies;
    returns (run folder, state root)."""
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir()
    server = RecordingFedAvg(RunRecords(run, {}), ledger=Ledger(run / "ledger.jsonl"))
    for node, silo in enumerate(SIGMA, start=1):
        own = Ledger(state / silo / "ledger.jsonl", signer=silo_signer(state, silo) if signed else None)
        for rnd in (1, 2):
            line = write_record(own, _round(silo, rnd, SIGMA[silo]))
            # as fl_client.flower_edge sends it: the line as written, in a ConfigRecord
            server.append_ledger(ConfigRecord({k: v for k, v in line.items() if isinstance(v, (str, int, float))}), node)
    gather_public_keys(state, SIGMA, run / "silo-keys")
    _write_metrics(run, SIGMA)
    return run, state


def _write_metrics(run: Path, sigma: dict[str, float]) -> None:
    """metrics.json train rows that match the ledger (the audit checks every round has its record)."""
    rows = [{"round": rnd, "phase": "train", "silo": silo, "node-id": 1, "steps": 8, "delta": 1e-5,
             "epsilon": _round(silo, rnd, sigma[silo]).epsilon_cumulative, "noise-multiplier": sigma[silo],
             "sample-rate": 0.25} for silo in sigma for rnd in (1, 2)]
    (run / "metrics.json").write_text(json.dumps({"run": {"run-id": 5, "dp": True, "config": {}}, "records": rows}))


def test_every_record_is_signed_and_verifies_in_both_ledgers(tmp_path: Path) -> None:
    run, state = _run(tmp_path)
    assert stat.S_IMODE(os.stat(state / "a" / KEY_NAME).st_mode) == 0o600
    lines = Ledger(run / "ledger.jsonl").read()
    assert len(lines) == 4 and all(len(x["signature"]) == 128 for x in lines)
    assert signature_problems(lines, run / "silo-keys") == []
    assert signature_problems(Ledger(state / "a" / "ledger.jsonl").read(), run / "silo-keys") == []
    assert signature_check(Ledger(run / "ledger.jsonl"), run / "silo-keys")["passed"]


def test_an_edited_and_rechained_record_fails_only_with_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = _run(tmp_path)
    path = run / "ledger.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    # the forger claims silo a used more noise, and recomputes ε and the chain to match
    for r in recs:
        if r["silo"] == "a":
            r["noise-multiplier"] = 2.5
            r["epsilon-cumulative"] = _round("a", r["round"], 2.5).epsilon_cumulative
    prev = "0" * 64
    for r in recs:
        r["prev-sha256"] = prev
        r["sha256"] = record_hash(r)
        prev = r["sha256"]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    _write_metrics(run, {**SIGMA, "a": 2.5})  # a server-side forger rewrites its own metrics.json too
    assert audit_run(run)["passed"]  # hash chain, ε recomputation and metrics↔ledger cannot see it
    assert main(["audit", str(run), "--json", "--silo-keys", str(run / "silo-keys")]) == 1
    result = json.loads(capsys.readouterr().out)
    failed = [c for c in result["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == ["ledger-signatures"]
    assert "ledger.jsonl:1: signature does not verify" in failed[0]["detail"]
    assert "ledger.jsonl:2: signature does not verify" in failed[0]["detail"]
    assert "ledger.jsonl:3" not in failed[0]["detail"]  # silo b's records are untouched


def test_unsigned_lines_still_parse_and_fail_the_signature_check(tmp_path: Path) -> None:
    run, _ = _run(tmp_path, signed=False)
    assert [r["kind"] for r in Ledger(run / "ledger.jsonl").read()] == ["dp-sgd-round"] * 4
    check = signature_check(Ledger(run / "ledger.jsonl"), run / "silo-keys")
    assert not check["passed"] and "ledger.jsonl:1: unsigned (silo a)" in check["detail"]
    assert signature_problems(Ledger(run / "ledger.jsonl").read(), tmp_path / "nowhere")[0].endswith(
        f"no public key for silo 'a' in {tmp_path / 'nowhere'}")


def test_bad_silo_keys_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = _run(tmp_path)
    (run / "silo-keys" / "a.pub").write_text("not a key\n")
    assert main(["audit", str(run), "--silo-keys", str(run / "silo-keys")]) == 2
    assert "a.pub: not a readable Ed25519 public key" in capsys.readouterr().err
    assert main(["audit", str(run), "--silo-keys", str(tmp_path / "missing")]) == 2
