"""White-box Dirac canaries (issue #13 item 3): insertion into Opacus's clipped sum, the
per-step likelihood-ratio score, the planned guess count, the audit report, and the
broken-noise audit on 5 seeds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from scipy.stats import binom

from fl_client.canary_audit import CanaryResult
from fl_client.gradient_canaries import DiracCanaries, inserted, likelihood_ratio, plan_guesses
from shared_model.config import RunConfig
from shared_model.privacy.audit_report import audit_run, write_report
from shared_model.privacy.one_run import epsilon_lower_bound
from tests.test_privacy_audit import _fake_run


def test_one_run_bound_is_the_binomial_tail_boundary() -> None:
    # 64 of 100 correct (the input canaries' figure on main): the bound ε has tail exactly 5 %
    eps = epsilon_lower_bound(100, 64)
    p = 1 / (1 + math.exp(-eps))
    assert binom.sf(63, 100, p) == pytest.approx(0.05, rel=1e-6)
    assert eps == pytest.approx(0.2155, abs=1e-4)  # the 0.22 of issue #13


def test_likelihood_ratio_known_value() -> None:
    x = torch.tensor([[1.0, 0.0]])
    want = math.log(0.75 + 0.25 * math.exp(0.5)) + math.log(0.75 + 0.25 * math.exp(-0.5))
    assert float(likelihood_ratio(x, 0.25, 1.0)[0]) == pytest.approx(want, abs=1e-12)


def _private_linear(noise: float) -> tuple[torch.nn.Module, DPOptimizer, torch.utils.data.DataLoader]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4, bias=False)
    data = torch.utils.data.TensorDataset(torch.zeros(16, 8), torch.zeros(16, dtype=torch.long))
    engine = PrivacyEngine()
    return engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               data_loader=torch.utils.data.DataLoader(data, batch_size=8),
                               noise_multiplier=noise, max_grad_norm=2.0, poisson_sampling=True)


def test_dirac_canaries_enter_the_clipped_sum_before_the_noise() -> None:
    model, opt, loader = _private_linear(noise=0.0)
    canaries = DiracCanaries.draw(20, sample_rate=1.0, seed=3)
    original = DPOptimizer.add_noise
    with inserted(canaries):
        assert DPOptimizer.add_noise is not original
        for x, y in loader:  # inputs are 0: the real clipped gradients are exactly 0
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert DPOptimizer.add_noise is original  # restored: only the audit's training is touched
    assert canaries.steps == len(loader) and len({c for c in canaries.coordinates}) == 20
    readings = torch.stack(canaries.readings, 1)  # per step, in units of C: 1 where included (q = 1), else 0
    assert torch.equal(readings, canaries.included.double().unsqueeze(1).expand_as(readings).to(readings.dtype))
    assert torch.equal(canaries.sampled, canaries.included.long() * canaries.steps)


def test_noise_reaches_the_readings() -> None:
    model, opt, loader = _private_linear(noise=1.0)
    canaries = DiracCanaries.draw(20, sample_rate=0.0, seed=4)  # never sampled: readings are pure noise N(0, σ²)
    with inserted(canaries):
        for _ in range(10):
            for x, y in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    readings = torch.stack(canaries.readings)
    assert int(canaries.sampled.sum()) == 0
    assert 0.7 < float(readings.std()) < 1.3


def test_planned_guesses_can_expose_a_leak_above_the_claim() -> None:
    k = plan_guesses(200, q=1 / 6, sigma=2.3, steps=6, epsilon=1.0)
    assert epsilon_lower_bound(k, k) > 1.0
    # a claim no M=200 run can exceed: the plan still returns a usable K
    assert 1 <= plan_guesses(200, q=1 / 124, sigma=0.44, steps=24, epsilon=8.0) <= 100


def _result(kind: str, lb: float, correct: int) -> dict:
    return CanaryResult(kind=kind, silo="a", m=100, included=50, guesses=20, correct=correct, k_in=20, k_out=0,
                        epsilon_lower_bound=lb, confidence=0.95, ledger_epsilon=1.0, delta=1e-5,
                        accountant="Opacus RDP", noise_multiplier_recorded=2.0, broken_noise=False, seconds=1.0,
                        ledger="x", steps=6, sample_rate=0.2, participated=30, reading_std_out=2.0).as_dict()


def test_report_shows_both_kinds_and_fails_the_leaking_one(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    result = audit_run(run, [_result("input", 0.2, 12), _result("gradient", 1.3, 20)])
    failed = [c["check"] for c in result["checks"] if not c["passed"]]
    assert failed == ["canary-lower-bound:gradient"] and not result["passed"]
    write_report(run, result)
    md = (run / "audit.md").read_text()
    assert "| input | a | 100 |" in md and "| gradient | a | 100 |" in md and "FAIL: bound above the claim" in md
    assert "std 2·C" in md


CI = {"num-server-rounds": 2, "local-steps": 3, "epsilon": 1.0, "max-eval-users": 0, "batch-size": 32}


@pytest.mark.slow
def test_gradient_canaries_fail_broken_noise_for_5_of_5_seeds(
    small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path
) -> None:
    from fl_client.canary_audit import run_canary_audit

    base = {"dataset": str(small_dataset), "base-model": str(tiny_bert), **CI}
    honest = run_canary_audit(RunConfig.from_run_config(base), 100, tmp_path / "honest", kind="gradient", seed=0)
    print(f"honest: {honest.correct}/{honest.guesses} lb={honest.epsilon_lower_bound:.3f} ε={honest.ledger_epsilon:.3f}")
    assert honest.passed and 0 < honest.ledger_epsilon <= 1.0 and honest.steps == 6
    for seed in range(5):
        res = run_canary_audit(RunConfig.from_run_config({**base, "audit-broken-noise": True}), 100,
                               tmp_path / f"broken-{seed}", kind="gradient", seed=seed)
        print(f"broken seed {seed}: {res.correct}/{res.guesses} lb={res.epsilon_lower_bound:.3f} ε={res.ledger_epsilon:.3f}")
        assert res.epsilon_lower_bound > res.ledger_epsilon and not res.passed, seed
