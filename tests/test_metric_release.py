"""Every number that leaves a silo is inside ε or declared (issue 13, item 2), and the audit
page (item 4): the Gaussian metric release, its calibration and accounting, the audit of a
heterogeneous composition, and how plain releases are declared."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fl_server.records import RunRecords
from shared_model.config import RunConfig
from shared_model.privacy import accountants
from shared_model.privacy.admission import admit
from shared_model.privacy.audit_report import audit_run, write_report
from shared_model.privacy.ledger import Ledger, record_hash
from shared_model.privacy.metric_release import (EVAL_COORDINATES, evaluation_metrics, evaluation_sums,
                                                 gaussian_noise, planned_releases)
from shared_model.privacy.policy import SiloPolicy
from shared_model.privacy.recompute import dpacc_pld, dpacc_rdp
from shared_model.privacy.records import DpSgdRound, MetricRelease, PlainRelease, history_of, write_record
from shared_model.privacy.state import PrivacyState


def analytic_gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """ε(δ) of one Gaussian mechanism, exactly (Balle & Wang, ICML 2018, Theorem 8):
    δ(ε) = Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ), solved for ε."""
    def gap(eps: float) -> float:
        a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
        return norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b) - delta
    return brentq(gap, 0.0, 100.0)


@pytest.mark.parametrize("sigma, delta", [(1.0, 1e-5), (4.0, 1e-5), (0.8, 1e-3)])
def test_dp_accounting_gaussian_matches_the_analytic_gaussian_mechanism(sigma: float, delta: float) -> None:
    exact = analytic_gaussian_epsilon(sigma, delta)
    # a metric release is a Gaussian mechanism without sampling: (σ, q = 1, 1) in a history
    assert dpacc_pld([(sigma, 1.0, 1)], delta) == pytest.approx(exact, abs=2e-3)
    # RDP is an upper bound, never below the exact value, and not far above it
    assert exact <= dpacc_rdp([(sigma, 1.0, 1)], delta) <= exact * 1.35 + 0.05
    assert exact <= accountants.create("rdp").epsilon([(sigma, 1.0, 1)], delta) <= exact * 1.35 + 0.05


def test_calibration_gives_metrics_their_share_and_the_whole_plan_fits_the_budget() -> None:
    cfg = RunConfig(num_server_rounds=3, local_steps=8, batch_size=32, epsilon=8.0, delta=1e-5,
                    popularity_prior=False, transitions=False)  # their shares: test_popularity_prior, test_transitions
    plain = PrivacyState.calibrate("s", cfg, num_users=400)
    dp = PrivacyState.calibrate("s", cfg, num_users=400, release_metrics="dp", metric_share=0.1)
    k = planned_releases(cfg, "dp")
    assert k == len(EVAL_COORDINATES) * 4 == dp.planned_releases
    metrics_alone = dp.epsilon_of([(dp.metric_noise_multiplier, 1.0, k)])
    assert 0.1 * 8.0 - 0.02 <= metrics_alone <= 0.1 * 8.0  # Opacus's calibration tolerance is 0.01
    plan = [(dp.noise_multiplier, dp.sample_rate, 8)] * 3 + [(dp.metric_noise_multiplier, 1.0, k)]
    assert 8.0 - 0.05 <= dp.epsilon_of(plan) <= 8.0  # the joint plan uses (almost) all of ε, never more
    assert dp.noise_multiplier > plain.noise_multiplier  # DP-SGD pays for the metrics with more noise
    assert plain.metric_noise_multiplier == 0.0 and plain.planned_releases == 0


def test_release_mode_is_the_more_private_of_policy_and_request() -> None:
    cfg = RunConfig(delta=1e-5)
    for policy, asked, got in [("dp", "plain", "dp"), ("plain", "plain", "plain"), ("plain", "dp", "dp"),
                               ("dp", "none", "none"), ("none", "plain", "none")]:
        decision = admit(SiloPolicy(release_metrics=policy), cfg.replace(**{"release-metrics": asked}))
        assert decision.release_metrics == got, (policy, asked)


def test_gaussian_release_sums_clipped_users_and_adds_the_stated_noise() -> None:
    correct = np.array([1.0, 0.0, np.nan, 1.0])
    hits = np.array([1.0, 0.5, 0.0, 2.0])  # 2.0 is clipped to 1
    sums = evaluation_sums(correct, hits, hits, hits, np.array([True, True, True, False]))
    assert sums == {"category-correct-sum": 2.0, "category-users": 3.0, "hr10-sum": 2.5, "ndcg10-sum": 2.5,
                    "mrr-sum": 2.5, "migrating-correct-sum": 1.0, "migrating-users": 2.0}
    draws = np.array([gaussian_noise({"x": 0.0}, 3.0, seed)["x"] for seed in range(4000)])
    assert abs(draws.mean()) < 0.2 and draws.std() == pytest.approx(3.0, rel=0.05)
    assert gaussian_noise(sums, 3.0, 7) == gaussian_noise(sums, 3.0, 7) != gaussian_noise(sums, 3.0, 8)
    exact = evaluation_metrics(sums, users=4)
    assert exact["category-accuracy"] == pytest.approx(2 / 3) and exact["hr10"] == pytest.approx(2.5 / 4)
    assert exact["category-accuracy-migrating"] == 0.5 and exact["migrating-users"] == 2.0


@functools.lru_cache(maxsize=1)
def _calibrated(cfg: RunConfig) -> PrivacyState:
    return PrivacyState.calibrate("a", cfg, num_users=300, release_metrics="dp", metric_share=0.2)


def _ledger_run(tmp_path: Path, plain: bool = False) -> Path:
    """A run folder whose ledger holds, per silo, DP-SGD rounds and metric releases (ε from a real
    calibrated PrivacyState) and, with ``plain``, one silo's plain-release declarations."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(num_server_rounds=2, local_steps=4, batch_size=32, epsilon=4.0, delta=1e-5,
                    transitions=False)  # DP-SGD and metrics only (the transition release: tests/test_transitions.py)
    led = Ledger(run / "ledger.jsonl")
    sent = []
    for silo in ("a", "b"):
        p = dataclasses.replace(_calibrated(cfg), silo=silo, history=[], rounds=[])
        for rnd in range(3):
            if rnd:
                p.record_round(rnd, 4)
                write_record(led, DpSgdRound(run_id="5", silo=silo, round=rnd, steps=4, sample_rate=p.sample_rate,
                                             noise_multiplier=p.noise_multiplier, max_grad_norm=1.0, delta=1e-5,
                                             accountant="rdp", epsilon_round=0.0, epsilon_cumulative=p.epsilon_spent,
                                             epsilon_budget=4.0))
                sent.append({"round": rnd, "phase": "train", "silo": silo, "num-examples": 300,
                             "release-metrics": "dp"})
            p.record_release(7)
            write_record(led, MetricRelease(run_id="5", silo=silo, round=rnd, phase="evaluate",
                                            names=",".join(EVAL_COORDINATES), releases=7,
                                            noise_multiplier=p.metric_noise_multiplier, sensitivity=1.0, delta=1e-5,
                                            accountant="rdp", epsilon_release=0.0,
                                            epsilon_cumulative=p.epsilon_spent, epsilon_budget=4.0))
            sent.append({"round": rnd, "phase": "evaluate", "silo": silo, "num-examples": 50, "hr10": 0.3,
                         "release-metrics": "dp"})
    if plain:
        for rnd in range(3):
            write_record(led, PlainRelease(run_id="5", silo="c", round=rnd, phase="evaluate",
                                           names="category-accuracy,hr10,ndcg10"))
            sent.append({"round": rnd, "phase": "evaluate", "silo": "c", "num-examples": 50, "hr10": 0.3,
                         "release-metrics": "plain"})
    (run / "metrics.json").write_text(json.dumps({"run": {"run-id": 5}, "records": sent}))
    return run


def test_audit_recomputes_the_heterogeneous_composition_and_shows_the_metrics_share(tmp_path: Path) -> None:
    run = _ledger_run(tmp_path)
    result = audit_run(run)
    assert result["passed"], [c for c in result["checks"] if not c["passed"]]
    a = result["silos"]["a"]
    assert a["kinds"].count("metric-release") == 3 and a["metric-releases"] == 21
    # dp-accounting RDP over the same integer orders agrees with Opacus on the whole composition
    assert a["epsilon-dp-accounting-rdp-integer-orders"] == pytest.approx(a["epsilon-opacus-rdp-integer-orders"],
                                                                        abs=1e-3)
    assert a["cross-accountant"]["dp-accounting PLD"] <= a["epsilon-reported"] + 1e-3
    # the releases alone spend the policy's share (0.2 × ε = 0.8); composed with DP-SGD they add far
    # less (RDP composition is sub-additive): the marginal share is what the page reports
    assert 0.78 <= a["epsilon-metric-releases-alone"] <= 0.8
    assert 0.0 < a["metric-share-of-epsilon"] < 0.2
    assert a["metric-share-of-epsilon"] == pytest.approx(1 - a["epsilon-dp-sgd-alone"] / a["epsilon-reported"],
                                                        rel=1e-3)
    assert a["epsilon-dp-sgd-alone"] < a["epsilon-reported"] <= 4.0 + 1e-6
    write_report(run, result)
    md = (run / "audit.md").read_text()
    assert "metrics' share of ε" in md and f"{a['metric-share-of-epsilon']:.1%}" in md
    assert "## The worst-case user" in md and "None recorded" in md
    assert (run / "audit-epsilon.png").stat().st_size > 5000
    # a forger triples the metric noise in one release and re-hashes the chain: recomputation fails
    recs = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]
    i = next(i for i, r in enumerate(recs) if r["kind"] == "metric-release" and r["silo"] == "b")
    recs[i]["noise-multiplier"] *= 3
    prev = "0" * 64
    for r in recs:
        r["prev-sha256"], r["sha256"] = prev, ""
        r["sha256"] = prev = record_hash(r)
    (run / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [c["check"] for c in audit_run(run)["checks"] if not c["passed"]] == ["recompute-opacus:b"]


def test_plain_release_is_declared_in_the_audit_and_an_undeclared_one_fails(tmp_path: Path) -> None:
    run = _ledger_run(tmp_path, plain=True)
    result = audit_run(run)
    assert result["passed"], [c for c in result["checks"] if not c["passed"]]
    write_report(run, result, tmp_path / "officer")  # fedshift audit --out DIR
    assert not (run / "audit.md").exists() and (tmp_path / "officer" / "audit-epsilon.png").stat().st_size > 5000
    md = (tmp_path / "officer" / "audit.md").read_text()
    assert "UNNOISED" in md and "| c | 2 | evaluate | category-accuracy, hr10, ndcg10 |" in md
    # metrics.json shows plain metrics the ledger does not declare: FAIL naming metrics.json, silo, round
    doc = json.loads((run / "metrics.json").read_text())
    doc["records"].append({"round": 3, "phase": "evaluate", "silo": "c", "num-examples": 50,
                           "release-metrics": "plain"})
    (run / "metrics.json").write_text(json.dumps(doc))
    bad = [c for c in audit_run(run)["checks"] if not c["passed"]]
    assert [c["check"] for c in bad] == ["metric-releases-on-ledger"]
    assert "metrics.json: c round 3 evaluate: plain metrics sent, no plain-release record" in bad[0]["detail"]


def test_round_table_marks_noisy_and_plain_metrics(tmp_path: Path) -> None:
    rec = RunRecords(tmp_path, {"accountant-label": "Opacus RDP"})
    rec.add(1, "train", "a", 1, {"epsilon": 1.0, "epsilon-budget": 8.0, "delta": 1e-5, "release-metrics": "dp"})
    rec.add(1, "evaluate", "a", 1, {"category-accuracy": 0.4, "ndcg10": 0.1, "hr10": 0.2, "release-metrics": "dp"})
    rec.add(1, "train", "b", 2, {"train-loss": 2.0, "epsilon": 1.0, "epsilon-budget": 8.0, "delta": 1e-5,
                                 "release-metrics": "plain"})
    rec.add(1, "evaluate", "b", 2, {"category-accuracy": 0.5, "ndcg10": 0.1, "hr10": 0.2, "release-metrics": "plain"})
    table = rec.table(1)
    rows = {line.split()[0]: line for line in table.splitlines()[3:5]}
    assert rows["a"].endswith("dp") and rows["b"].endswith("PLAIN")
    assert "dp: cat acc, NDCG@10, HR@10 are NOISY releases (Gaussian mechanism, inside the silo's ε)" in table
    assert "PLAIN: loss, cat acc, NDCG@10, HR@10 left the silo UNNOISED — OUTSIDE ε [b]" in table
    rec.write()
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["metric-releases"]["b"] == {"release-metrics": ["plain"],
                                           "outside-epsilon": ["train-loss", "category-accuracy", "ndcg10", "hr10"]}
    assert doc["metric-releases"]["a"] == {"release-metrics": ["dp"], "outside-epsilon": []}


def test_history_of_a_metric_release_is_a_gaussian_without_sampling() -> None:
    r = MetricRelease(run_id="1", silo="s", round=0, phase="evaluate", names="x", releases=7, noise_multiplier=20.0,
                      sensitivity=1.0, delta=1e-5, accountant="rdp", epsilon_release=0.1, epsilon_cumulative=0.1,
                      epsilon_budget=8.0)
    assert history_of([r]) == [(20.0, 1.0, 7)]


@pytest.mark.slow  # one Flower simulation: 3 silos × 1 round, tiny BERT
def test_a_plain_run_says_in_the_table_and_the_audit_which_numbers_are_outside_epsilon(
        tmp_path: Path, small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> None:
    import subprocess
    import sys

    from tests.test_simulation import _simulate

    out = tmp_path / "run"
    for silo in ("p0-r0", "p1-r0", "p2-r0"):  # the silo owners chose plain; the run asks for it
        (out / "silo-state" / silo).mkdir(parents=True)
        (out / "silo-state" / silo / "policy.toml").write_text('release-metrics = "plain"\n')
    proc = _simulate(out, "--dataset", str(small_dataset), "--base-model", str(tiny_bert), "--rounds", "1",
                     "--set", "local-steps=2", "--set", "batch-size=16", "--set", "max-eval-users=16",
                     "--set", "release-metrics=plain")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "PLAIN: loss, cat acc, NDCG@10, HR@10 left the silo UNNOISED — OUTSIDE ε [p0-r0, p1-r0, p2-r0]" in log
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["metric-releases"]) == {"p0-r0", "p1-r0", "p2-r0"}
    assert {"train-loss", "category-accuracy", "hr10"} <= set(doc["metric-releases"]["p0-r0"]["outside-epsilon"])
    audit = subprocess.run([sys.executable, "-m", "fedshift.cli", "audit", str(out)], capture_output=True, text=True,
                           timeout=600, check=False)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    md = (out / "audit.md").read_text()
    assert "These numbers left the silo UNNOISED (release-metrics = plain): no ε covers them." in md
    assert ("| p0-r0 | 1 | train | clipped-interest, clipped-ranking, empty-steps, grad-norm-interest, "
            "grad-norm-ranking, train-loss, train-seconds |") in md  # the per-group clipping figures too
    assert "release-metrics`: p0-r0 = **plain**" in md
    # no Gaussian release: the metrics spend nothing; the silo's ε is its DP-SGD rounds alone
    assert all(s["metric-releases"] == 0 for s in audit_run(out)["silos"].values())
