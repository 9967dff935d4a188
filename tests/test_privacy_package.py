"""The privacy package on its own: record kinds, accountants, budget rules, and the
audit's independence from the training bookkeeping."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from shared_model.config import RunConfig
from shared_model.privacy import accountants, budget, records
from shared_model.privacy.ledger import Ledger, LedgerError
from shared_model.privacy.records import DpSgdRound, Refusal, parse_record, read_records, write_record
from shared_model.privacy.recompute import opacus_epsilon
from shared_model.privacy.state import PrivacyState

PACKAGE = Path(__file__).resolve().parents[1] / "shared_model" / "privacy"
HISTORY = [(1.0, 0.05, 200), (0.9, 0.05, 50), (1.3, 1.0, 1)]  # DP-SGD rounds, then a histogram release


def _round(run: str = "1", rnd: int = 1, sigma: float = 1.1, q: float = 0.02, steps: int = 40, **kw: object) -> DpSgdRound:
    base = dict(run_id=run, silo="s", round=rnd, steps=steps, sample_rate=q, noise_multiplier=sigma, max_grad_norm=1.0,
                delta=1e-5, accountant="rdp", epsilon_round=0.5, epsilon_cumulative=0.5, epsilon_budget=8.0)
    return DpSgdRound(**{**base, **kw})  # type: ignore[arg-type]


def _refusal(run: str = "1", rnd: int = 3) -> Refusal:
    return Refusal(run_id=run, silo="s", round=rnd, rule="run-budget", reason="over budget", steps=40, sample_rate=0.02,
                   noise_multiplier=1.1, delta=1e-5, accountant="rdp", epsilon_cumulative=7.9, epsilon_requested=9.0,
                   epsilon_limit=8.0, epsilon_budget=8.0, time="2026-01-01T00:00:00+00:00")


def test_record_kinds_round_trip_with_dashed_keys(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.jsonl")
    full = _round(epsilon_lifetime=0.7, runs_on_ledger=2, num_users=100, model_sha256="ab" * 32, time="t")
    written = write_record(led, full)
    assert written["kind"] == "dp-sgd-round" and written["epsilon-cumulative"] == 0.5 and "epsilon_cumulative" not in written
    write_record(led, _round(rnd=2))  # optional fields left off the line
    write_record(led, _refusal())
    back = read_records(led)
    assert back == [full, _round(rnd=2), _refusal()]
    assert "epsilon-lifetime" not in led.read()[1]
    assert records.dp_rounds(back) == back[:2] and records.refusals(back) == [back[2]]
    assert records.history_of(records.dp_rounds(back)) == [(1.1, 0.02, 40), (1.1, 0.02, 40)]


def test_dp_round_line_is_byte_identical_to_the_dict_written_before(tmp_path: Path) -> None:
    """The line of a typed DP-SGD round equals the one the untyped dict gave (same keys, values)."""
    rec = _round(epsilon_lifetime=0.7, runs_on_ledger=1, num_users=100, model_sha256="ab" * 32, time="t")
    old = {"kind": "dp-sgd-round", "run-id": "1", "silo": "s", "round": 1, "steps": 40, "sample-rate": 0.02,
           "noise-multiplier": 1.1, "max-grad-norm": 1.0, "delta": 1e-5, "accountant": "rdp", "epsilon-round": 0.5,
           "epsilon-cumulative": 0.5, "epsilon-budget": 8.0, "epsilon-lifetime": 0.7, "runs-on-ledger": 1,
           "num-users": 100, "model-sha256": "ab" * 32, "time": "t"}
    Ledger(tmp_path / "old.jsonl").append(old)
    write_record(Ledger(tmp_path / "new.jsonl"), rec)
    assert (tmp_path / "old.jsonl").read_bytes() == (tmp_path / "new.jsonl").read_bytes()


def test_unknown_kind_and_bad_fields_name_file_and_line(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.jsonl")
    write_record(led, _round())
    led.append({"kind": "histogram-release", "run-id": "1"})
    with pytest.raises(LedgerError, match=r"^ledger.jsonl:2: unknown record kind 'histogram-release'"):
        read_records(led)
    raw = _round().to_dict()
    with pytest.raises(LedgerError, match=r"^x.jsonl:4: dp-sgd-round record lacks field steps"):
        parse_record({k: v for k, v in raw.items() if k != "steps"}, "x.jsonl", 4)
    with pytest.raises(LedgerError, match=r"field steps: expected int"):
        parse_record({**raw, "steps": "40"}, "x.jsonl", 4)
    with pytest.raises(LedgerError, match=r"unknown field\(s\) colour"):
        parse_record({**raw, "colour": "red"}, "x.jsonl", 4)
    with pytest.raises(ValueError, match="not envelope keys"):
        write_record(led, _round(), {"colour": "red"})


def test_a_new_kind_slots_in_without_touching_the_ledger(tmp_path: Path) -> None:
    @dataclasses.dataclass(frozen=True)
    class HistogramRelease(records.Record):
        KIND: ClassVar[str] = "test-histogram-release"
        run_id: str
        silo: str
        epsilon: float

    records.register(HistogramRelease)
    try:
        led = Ledger(tmp_path / "ledger.jsonl")
        write_record(led, _round())
        write_record(led, HistogramRelease("1", "s", 0.25))
        back = read_records(led)
        assert back[1] == HistogramRelease("1", "s", 0.25)
        # ε is computed from DP-SGD rounds only: a kind the accounting does not know spends nothing
        assert records.dp_rounds(back) == back[:1]
    finally:
        del records.KINDS[HistogramRelease.KIND]


@pytest.mark.parametrize("name, opacus_class", [("rdp", RDPAccountant), ("prv", PRVAccountant), ("gdp", GaussianAccountant)])
def test_each_accountant_wrapper_equals_opacus(name: str, opacus_class: type) -> None:
    acc = accountants.create(name)
    theirs = opacus_class()
    theirs.history = list(HISTORY)
    assert acc.epsilon(HISTORY, 1e-5) == theirs.get_epsilon(delta=1e-5)
    assert acc.epsilon([], 1e-5) == 0.0
    assert acc.noise_multiplier(4.0, 1e-5, 0.05, 200) == get_noise_multiplier(
        target_epsilon=4.0, target_delta=1e-5, sample_rate=0.05, steps=200, accountant=name)
    # the audit's own call of Opacus gives the same figure
    assert opacus_epsilon(name, HISTORY, 1e-5) == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=1e-12)
    assert accountants.labels()[name] == acc.label == f"Opacus {name.upper()}"
    with pytest.raises(ValueError, match="unknown accountant 'bogus'"):
        accountants.create("bogus")


def test_audit_does_not_import_the_training_bookkeeping() -> None:
    training = {"shared_model.privacy.accountants", "shared_model.privacy.state", "shared_model.privacy.budget"}
    for module in ("recompute.py", "audit_report.py", "one_run.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m == t or m.startswith(t + ".") for m in imported for t in training), (module, imported)
    code = ("import sys, shared_model.privacy.audit_report, shared_model.privacy.recompute;"
            "print(sorted(m for m in sys.modules if m.startswith(('shared_model.privacy.accountants',"
            "'shared_model.privacy.state', 'shared_model.privacy.budget', 'flwr', 'fl_client', 'fl_server'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_privacy_package_imports_neither_flower_nor_the_apps() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m.split(".")[0] for m in names} & {"flwr", "fl_client", "fl_server"}, path


def _state(history: list[tuple[float, float, int]] = ()) -> PrivacyState:  # type: ignore[assignment]
    return PrivacyState("s", "rdp", 8.0, 1e-5, 1.1, 0.02, 200, history=list(history))


def test_budget_rules_refuse_by_name() -> None:
    fresh = _state()
    assert budget.check(fresh, 40, 0.0, []) is None
    spent = _state([(1.1, 0.02, 5000)])  # far over ε = 8
    refusal = budget.check(spent, 40, 0.0, [])
    assert refusal is not None and refusal.rule == budget.RUN_BUDGET == "run-budget"
    assert refusal.epsilon_limit == 8.0 and refusal.epsilon_requested == pytest.approx(spent.epsilon_after(40))
    assert "> budget 8" in refusal.reason
    assert not budget.can_train(spent, 40) and budget.can_train(fresh, 40)
    # another run on the ledger spent ε: the lifetime cap refuses, refusals on the ledger count for nothing
    other_run = [_round(run="0", steps=150), _refusal(run="0")]
    cap = fresh.epsilon_of([(1.1, 0.02, 150), (1.1, 0.02, 40)]) - 1e-3
    lifetime = budget.check(fresh, 40, cap, other_run, "silo/ledger.jsonl")
    assert lifetime is not None and lifetime.rule == budget.LIFETIME_BUDGET and "silo/ledger.jsonl" in lifetime.reason
    assert budget.lifetime_epsilon(fresh, other_run) == budget.lifetime_epsilon(fresh, other_run[:1])
    assert budget.check(fresh, 40, cap + 2e-3, other_run) is None


def test_restart_restores_from_rounds_and_ignores_refusals(
    small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path
) -> None:
    from fl_client.silo_gate import open_gate
    from fl_client.silo_round import SiloSetup, privacy_for

    cfg = RunConfig.from_run_config({"dataset": str(small_dataset), "base-model": str(tiny_bert), "local-steps": 2,
                                     "batch-size": 16, "num-server-rounds": 2})
    node = {"partition-id": 0, "state-dir": str(tmp_path)}
    gate = open_gate(cfg.to_run_config(), node)
    assert gate.admitted, gate.refusal
    silo = SiloSetup.admitted(gate, node)
    fresh = privacy_for(silo, run_id=9)
    assert fresh.history == [] and fresh.rounds == []
    sigma, q = fresh.noise_multiplier, fresh.sample_rate
    rnd = _round(run="9", sigma=sigma, q=q, steps=2)
    write_record(silo.ledger, dataclasses.replace(rnd, silo=silo.data.name))
    write_record(silo.ledger, dataclasses.replace(_refusal(run="9", rnd=2), silo=silo.data.name))
    write_record(silo.ledger, dataclasses.replace(rnd, silo=silo.data.name, run_id="8"))  # another run
    restored = privacy_for(silo, run_id=9)
    assert restored.history == [(sigma, q, 2)] and restored.rounds == [1]
    assert restored.epsilon_spent == accountants.create("rdp").epsilon([(sigma, q, 2)], cfg.delta)
