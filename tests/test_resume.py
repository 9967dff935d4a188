"""``--resume RUN_DIR`` (issue 11): a run interrupted after round 2 of 3 continues from its
last checkpoint into the same folder; each silo charges the resumed rounds to the ORIGINAL
run's budget on its own ledger, so ε after round 3 equals an uninterrupted 3-round run's.

Fast: the run-folder checks (not a run, no checkpoint, a conflicting flag, a finished run)
at the CLI, the records a resumed server keeps, and the silo side through the real ClientApp
handler (the original run's budget spent on its own ledger: refused with a record; a ledger
whose mechanism differs: refused). Slow: a real simulation, interrupted (SIGINT) once round
2's checkpoint exists, resumed with ``fedshift simulate --resume``.
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fl_client import client_app
from fl_server.records import RunRecords
from fedshift.simulation import prepare_silo_state, run_simulation
from shared_model.config import RunConfig
from shared_model.dataset import list_silos
from shared_model.privacy.ledger import Ledger
from shared_model.privacy.records import (DpSgdRound, PopularityRelease, Refusal, TransitionRelease, dp_rounds,
                                          read_records, write_record)
from shared_model.privacy.state import PrivacyState
from shared_model.run_folder import ResumeError, resume_plan
from tests.test_silo_policy import _message, task_identity  # noqa: F401 (a fixture)


def _fake_run(folder: Path, rounds_done: int, cfg: RunConfig, run_id: int = 11) -> Path:
    """A run folder as the ServerApp leaves it (metrics.json, checkpoint metadata up to ``rounds_done``)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"round": r, "phase": "train", "silo": "s", "node-id": 1} for r in range(1, rounds_done + 2)]
    doc = {"run": {"run-id": run_id, "config": cfg.to_run_config(), "missing": [{"round": rounds_done + 1}]},
           "rounds": [], "records": records, "problems": [], "outcomes": []}
    (folder / "metrics.json").write_text(json.dumps(doc))
    for r in range(rounds_done + 1):
        (folder / "checkpoints" / f"round-{r:03d}").mkdir(parents=True)
        (folder / "checkpoints" / f"round-{r:03d}" / "fedshift.json").write_text("{}")
    (folder / "checkpoints" / f"round-{rounds_done + 1:03d}").mkdir()  # begun, never completed
    return folder


def test_resume_plan_reads_the_run_and_refuses_what_it_cannot_resume(tmp_path: Path) -> None:
    cfg = RunConfig(num_server_rounds=3, epsilon=4.0)
    run = _fake_run(tmp_path / "run", 2, cfg)
    plan = resume_plan(run, {"epsilon": 4, "num-server-rounds": 3, "out-dir": "/elsewhere"})
    assert (plan.run_id, plan.last_round, plan.rounds_left, plan.finished) == ("11", 2, 1, False)
    assert plan.checkpoint.name == "round-002" and plan.cfg.resume_run_id == "11"
    assert plan.cfg.out_dir == str(run) and plan.cfg.epsilon == 4.0
    again = _fake_run(tmp_path / "again", 1, plan.cfg, run_id=12)  # a resumed run resumed: the ORIGINAL id
    assert resume_plan(again).run_id == "11"
    with pytest.raises(ResumeError, match=r"metrics.json: epsilon = 8.0 conflicts with the run's recorded epsilon = 4.0"):
        resume_plan(run, {"epsilon": 8.0})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResumeError, match=r"empty/metrics.json: missing; .* not a fedshift run folder"):
        resume_plan(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.json").write_text("{\"run\": {}}")
    with pytest.raises(ResumeError, match="no run section with run-id and config"):
        resume_plan(tmp_path / "empty")
    bare = _fake_run(tmp_path / "bare", 0, cfg)
    for child in sorted((bare / "checkpoints").rglob("fedshift.json")):
        child.unlink()
    with pytest.raises(ResumeError, match=r"checkpoints: no checkpoint \(round-NNN/fedshift.json\); nothing to resume"):
        resume_plan(bare)


def test_resume_at_the_cli_one_line_errors_and_a_finished_run_is_a_no_op(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedshift.cli import main

    cfg = RunConfig(num_server_rounds=2)
    done = _fake_run(tmp_path / "done", 2, cfg)
    before = sorted(p.name for p in done.iterdir())
    assert main(["simulate", "--resume", str(done)]) == 0
    out = capsys.readouterr().out
    assert "already completed its 2 rounds" in out and "nothing to resume" in out
    assert sorted(p.name for p in done.iterdir()) == before  # nothing written
    cases = [
        (("simulate", "--resume", str(tmp_path / "nope")), "not a folder"),
        (("simulate", "--resume", str(done), "--rounds", "5"), "num-server-rounds = 5 conflicts"),
        (("simulate", "--resume", str(done), "--set", "nokey=1"), "--set nokey: unknown key"),
        (("simulate", "--resume", str(done), "--out", str(tmp_path)), "writes into its own folder"),
        (("deploy", "local", "--resume", str(_fake_run(tmp_path / "sim", 1, cfg))), "deployment.json: not a readable"),
        (("deploy", "local", "--out", str(tmp_path / "x")), "--silos N and --out DIR are required"),
    ]
    for args, message in cases:
        assert main(list(args)) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_resumed_server_keeps_the_records_up_to_its_checkpoint(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", 2, RunConfig())
    doc = json.loads((run / "metrics.json").read_text())
    records = RunRecords.resumed(run, doc, {"run-id": 99, "from-round": 2})
    assert [r["round"] for r in records.records] == [1, 2]  # round 3 (no checkpoint) runs again
    assert records.run_info["run-id"] == 11 and records.run_info["resumed"] == [{"run-id": 99, "from-round": 2}]
    assert records.run_info["missing"] == []


# ------------------------------------------------------------------ the silo's side
def _silo_context(small_dataset: Path, tiny_bert: Path, state: Path, run_id: int, **asked: object) -> tuple:
    cfg = RunConfig.from_run_config({"dataset": str(small_dataset), "base-model": str(tiny_bert),
                                     "num-server-rounds": 3, "local-steps": 2, "batch-size": 16,
                                     "release-metrics": "none", **asked})  # DP-SGD rounds alone on the ledger
    silo = list_silos(small_dataset)[0]
    prepare_silo_state(state, [silo], silo_seed=3)
    node = {"partition-id": 0, "state-dir": str(state)}
    return cfg, silo, Context(run_id=run_id, node_id=7, node_config=node, state=RecordDict(),
                              run_config=cfg.to_run_config())


def _spend(ledger: Ledger, cfg: RunConfig, silo: str, num_users: int, rounds: int, run_id: str,
           sigma_scale: float = 1.0) -> PrivacyState:
    """Write the popularity and transition releases and ``rounds`` DP-SGD round records as the
    silo would have (calibrated z, σ, q)."""
    state = PrivacyState.calibrate(silo, cfg, num_users=num_users)
    state.record_popularity()
    write_record(ledger, PopularityRelease(
        run_id=run_id, silo=silo, round=0, platform="p0", items=10, max_items=cfg.popularity_max_items,
        noise_multiplier=state.popularity_noise_multiplier, sensitivity=cfg.popularity_max_items ** 0.5,
        delta=cfg.delta, accountant=cfg.accountant, epsilon_release=state.epsilon_spent,
        epsilon_cumulative=state.epsilon_spent, epsilon_budget=cfg.epsilon))
    if cfg.transitions:
        state.record_transitions()
        write_record(ledger, TransitionRelease(
            run_id=run_id, silo=silo, round=0, platform="p0", pairs=10, max_pairs=cfg.transition_max_pairs,
            noise_multiplier=state.transition_noise_multiplier, sensitivity=cfg.transition_max_pairs ** 0.5,
            delta=cfg.delta, accountant=cfg.accountant,
            epsilon_release=state.epsilon_of([(state.transition_noise_multiplier, 1.0, 1)]),
            epsilon_cumulative=state.epsilon_spent, epsilon_budget=cfg.epsilon))
    for r in range(1, rounds + 1):
        state.record_round(r, cfg.local_steps)
        write_record(ledger, DpSgdRound(
            run_id=run_id, silo=silo, round=r, steps=cfg.local_steps, sample_rate=state.sample_rate,
            noise_multiplier=state.noise_multiplier * sigma_scale, max_grad_norm=cfg.max_grad_norm,
            delta=cfg.delta, accountant=cfg.accountant, epsilon_round=0.0, epsilon_cumulative=state.epsilon_spent,
            epsilon_budget=cfg.epsilon))
    return state


@pytest.mark.parametrize("sigma_scale, status, rule", [(1.0, "budget-exhausted", "run-budget"),
                                                        (0.5, "refused", "resume-mismatch")])
def test_a_resumed_run_is_charged_to_the_original_runs_budget_on_the_silos_ledger(
        small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path, task_identity: None,
        sigma_scale: float, status: str, rule: str) -> None:
    from fl_client.silo_round import count_train_users

    cfg, silo, ctx = _silo_context(small_dataset, tiny_bert, tmp_path, run_id=9, **{"resume-run-id": "5"})
    ledger = Ledger(tmp_path / silo / "ledger.jsonl")
    users = count_train_users(cfg, dict(ctx.node_config))
    spent = _spend(ledger, cfg, silo, users, 3, "5", sigma_scale)  # run 5 spent all its 3 planned rounds
    reply = client_app.train(_message(cfg, 4), ctx)
    assert reply.content["status"]["status"] == status and reply.content["status"]["rule"] == rule
    assert reply.content["metrics"]["num-examples"] == 0
    last = read_records(ledger)[-1]
    assert isinstance(last, Refusal) and (last.run_id, last.resumed_in, last.rule) == ("5", "9", rule)
    if rule == "run-budget":  # the silo's own figure for run 5, not one the server sent
        assert last.epsilon_cumulative == pytest.approx(spent.epsilon_spent, rel=1e-12)
        assert last.epsilon_requested > cfg.epsilon
    assert len(dp_rounds(read_records(ledger))) == 3  # nothing trained, nothing charged


# ------------------------------------------------------------------ a real interrupted run
def _processes_of(out: Path) -> list[str]:
    """Live processes started for the run in ``out`` (their environment names its silo state;
    other engineers' simulations on this machine do not)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and \
                    proc.environ().get("FEDSHIFT_STATE", "").startswith(str(out)):
                found.append(" ".join(proc.info["cmdline"] or []))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _interrupt_when(path: Path, stop: threading.Event) -> None:
    """SIGINT to the main thread (as Ctrl-C) as soon as ``path`` exists."""
    while not stop.is_set():
        if path.exists():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_simulate_interrupted_after_round_2_resumes_to_3_with_the_same_epsilon(
        tiny_bert: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedshift.cli import main
    from simulations.datasets.generator import generate

    dataset = tmp_path / "ds"
    generate(dataset, users=160, platforms=2, regions=1, seed=1)  # 2 silos: the cheapest federation
    out = tmp_path / "run"
    silos = list_silos(dataset)
    cfg = RunConfig.from_run_config({
        "dataset": str(dataset), "base-model": str(tiny_bert), "num-server-rounds": 3, "local-steps": 2,
        "batch-size": 16, "max-eval-users": 8, "min-nodes": len(silos),
        "release-metrics": "none"})  # ε of DP-SGD rounds and the popularity release, to compare with one accountant
    stop = threading.Event()
    watcher = threading.Thread(target=_interrupt_when, args=(out / "checkpoints" / "round-002", stop), daemon=True)
    # Ctrl-C as in a fresh `fedshift simulate` process: Python's default handler, whatever code that
    # ran earlier in this pytest process left installed (the full suite once went through here with
    # no KeyboardInterrupt, and the test alone passes)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"SIGINT handler found before the run: {handler!r}")  # shown if the test fails
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_simulation(cfg, out, stream=io.StringIO(), silo_seed=5)
    finally:
        stop.set()
        signal.signal(signal.SIGINT, handler)
    assert not _processes_of(out)
    original = json.loads((out / "metrics.json").read_text())["run"]["run-id"]
    ledgers = {s: Ledger(out / "silo-state" / s / "ledger.jsonl") for s in silos}
    assert {s: [r.round for r in dp_rounds(read_records(ledgers[s]))] for s in silos} == {s: [1, 2] for s in silos}

    capsys.readouterr()
    assert main(["simulate", "--resume", str(out)]) == 0  # the CLI, in this process
    shown = capsys.readouterr().out
    assert "resuming run" in shown and "rounds 3-3" in shown
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["run"]["run-id"] == original and [r["from-round"] for r in doc["run"]["resumed"]] == [2]
    resumed_id = str(doc["run"]["resumed"][0]["run-id"])
    assert resumed_id != str(original)
    assert {r["round"] for r in doc["records"] if r["phase"] == "train"} == {1, 2, 3}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-000", "round-001", "round-002",
                                                                       "round-003"]
    for silo in silos:
        rounds = dp_rounds(read_records(ledgers[silo]))
        assert [r.round for r in rounds] == [1, 2, 3]  # continued: no round reset or counted twice
        assert {r.run_id for r in rounds} == {str(original)}  # charged to the original run's budget
        assert [r.resumed_in for r in rounds] == [None, None, resumed_id]
        assert [r.KIND for r in read_records(ledgers[silo]) if r.KIND.endswith("-release")] == [
            "popularity-release", "transition-release"]
        # an uninterrupted 3-round run: the calibrated mechanism, 3 rounds, one accountant
        plan = PrivacyState.calibrate(silo, cfg, num_users=rounds[0].num_users)
        plan.record_popularity()  # released once, before round 1 (not again on resume)
        plan.record_transitions()  # likewise
        for r in range(3):
            plan.record_round(r + 1, cfg.local_steps)
        assert all(r.noise_multiplier == pytest.approx(plan.noise_multiplier, rel=1e-12) for r in rounds)
        assert rounds[-1].epsilon_cumulative == pytest.approx(plan.epsilon_spent, rel=1e-9)
        assert rounds[-1].epsilon_cumulative <= cfg.epsilon + 1e-6
        train = [r for r in doc["records"] if r["phase"] == "train" and r["silo"] == silo and r["round"] == 3]
        assert train[0]["epsilon"] == pytest.approx(plan.epsilon_spent, rel=1e-9)

    lines = {s: len(ledgers[s].read()) for s in silos}
    assert main(["simulate", "--resume", str(out)]) == 0
    assert "already completed its 3 rounds" in capsys.readouterr().out
    assert {s: len(ledgers[s].read()) for s in silos} == lines
    assert not _processes_of(out)
