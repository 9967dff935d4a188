"""A silo's accountant state for one run: the noise calibrated once for the whole run and
the accountant's history so far, so ε composes over rounds.

Noise is calibrated once from the *total* budget (ε_total, δ) for the planned
``num-server-rounds × local-steps`` Poisson-sampled steps, so the cumulative ε after the
last planned step is ≤ ε_total (Opacus ``get_noise_multiplier``). A restarted silo
rebuilds the history from its ledger's DP-SGD round records of the run (:meth:`restore`).

With ``popularity-prior`` the run plans one Gaussian histogram release
(:mod:`shared_model.popularity`) whose marginal cost is ``popularity-epsilon-share × ε``,
and with ``transitions`` one Gaussian release of item-transition counts
(:mod:`shared_model.transitions`) whose marginal cost is ``transition-epsilon-share × ε``:
everything else is calibrated to the rest of ε, the transition release gets the smallest
noise that keeps the composition within ``(1 − popularity share) × ε``, and the popularity
release the smallest noise that keeps the whole composition within ε;
with ``release-metrics = "dp"`` the run also plans Gaussian metric releases
(:mod:`shared_model.privacy.metric_release`): their noise multiplier is calibrated so that
the planned releases alone spend ``metric-epsilon-share × ε_total``, and the DP-SGD noise is
then calibrated so that DP-SGD *and* the planned releases, composed in one accountant, spend
≤ ε_total (:func:`joint_noise_multiplier`). Both kinds enter one history, so the budget
rules and the ledger's cumulative ε count the metrics too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared_model.config import RunConfig
from shared_model.privacy import accountants
from shared_model.privacy.accountants import Accountant
from shared_model.privacy.records import (DpSgdRound, MetricRelease, PopularityRelease, Spending, TransitionRelease,
                                          history_of)

History = list[tuple[float, float, int]]


def sample_rate_for(num_users: int, batch_size: int) -> float:
    """Poisson sample rate exactly as Opacus's DPDataLoader derives it: 1 / #batches."""
    return 1.0 / math.ceil(num_users / max(1, min(batch_size, num_users)))


def merged_history(history: History) -> History:
    """History with consecutive equal mechanisms merged (as Opacus's accountant stores it)."""
    out: History = []
    for sigma, q, steps in history:
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + int(steps))
        else:
            out.append((float(sigma), float(q), int(steps)))
    return out


class RestoreMismatch(RuntimeError):
    """A run's rounds on the ledger used other mechanism parameters than this run config calibrates."""


def joint_noise_multiplier(acc: Accountant, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                           fixed: History, epsilon_tolerance: float = 0.01) -> float:
    """A DP-SGD σ such that ``steps`` steps at rate ``sample_rate`` composed with the ``fixed``
    history spend ε in [target − tolerance, target] (the tolerance of Opacus's own calibration).

    Opacus's ``get_noise_multiplier`` calibrates one homogeneous mechanism; with other
    mechanisms in the history, ε is still decreasing in σ, so the same bisection is run here
    on the accountant's own ε of the whole history."""
    if acc.epsilon(fixed, delta) >= target_epsilon:
        raise ValueError(f"the fixed releases alone spend ε ≥ {target_epsilon:g}; nothing is left for DP-SGD")

    def eps(sigma: float) -> float:
        return acc.epsilon([(sigma, sample_rate, steps)] + fixed, delta)

    lo = acc.noise_multiplier(target_epsilon, delta, sample_rate, steps)  # without the fixed part: too small
    hi = lo * 1.25
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        lo, hi = hi, hi * 1.5
        eps_hi = eps(hi)
    while eps_hi < target_epsilon - epsilon_tolerance:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e > target_epsilon:
            lo = mid
        else:
            hi, eps_hi = mid, e
    return hi


def release_noise_multiplier(acc: Accountant, target_epsilon: float, delta: float, history: History,
                             epsilon_tolerance: float = 0.01) -> float:
    """The smallest noise multiplier z (to ``epsilon_tolerance``) of one more Gaussian mechanism
    without sampling, ``(z, 1.0, 1)``, such that ``history`` composed with it spends ≤ ε: the
    release gets what ``history`` leaves of the budget (ε is decreasing in z; bisection on the
    accountant's own ε of the whole history)."""
    def eps(z: float) -> float:
        return acc.epsilon(history + [(z, 1.0, 1)], delta)

    if acc.epsilon(history, delta) >= target_epsilon:
        raise ValueError(f"the rest of the plan alone spends ε ≥ {target_epsilon:g}; nothing is left for the release")
    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
    while True:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e > target_epsilon:
            lo = mid
        else:
            hi = mid
            if e >= target_epsilon - epsilon_tolerance or hi - lo < 1e-4:
                return hi


@dataclass
class PrivacyState:
    silo: str
    accountant: str
    epsilon_budget: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    history: History = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    release_metrics: str = "none"  # none | dp | plain (the admitted mode)
    metric_noise_multiplier: float = 0.0  # dp: σ of each released coordinate, in sensitivities
    planned_releases: int = 0  # dp: Gaussian metric coordinates planned for the run
    popularity_noise_multiplier: float = 0.0  # popularity-prior: z of the histogram release (0: none planned)
    transition_noise_multiplier: float = 0.0  # transitions: z of the transition-count release (0: none planned)

    @classmethod
    def calibrate(cls, silo: str, cfg: RunConfig, num_users: int, release_metrics: str = "none",
                  metric_share: float = 0.0) -> "PrivacyState":
        """Noise for the run. DP-SGD and the metric releases (``metric_share`` of ε as if alone)
        are calibrated to spend together ``(1 − popularity share − transition share) × ε`` (the
        share of a release that is off is not taken); the transition release then gets the
        smallest noise such that everything composed so far spends ≤ ``(1 − popularity share) × ε``,
        and the popularity histogram the smallest noise such that everything composed spends
        ≤ ε. Each release's *marginal* cost is its share; alone it would spend more, since ε
        composes sub-additively."""
        from shared_model.privacy.metric_release import planned_releases

        q = sample_rate_for(num_users, cfg.batch_size)
        planned = cfg.num_server_rounds * cfg.local_steps
        acc = accountants.create(cfg.accountant)
        releases = planned_releases(cfg, release_metrics) if cfg.dp else 0
        z = zp = zt = 0.0
        popularity = cfg.dp and cfg.popularity_prior
        transitions = cfg.dp and cfg.transitions
        pop_share = cfg.popularity_epsilon_share if popularity else 0.0
        trans_share = cfg.transition_epsilon_share if transitions else 0.0
        # what DP-SGD and the metric releases may spend: all of ε, or what the releases leave
        rest = cfg.epsilon * (1.0 - pop_share - trans_share)
        if releases and metric_share > 0:
            z = acc.noise_multiplier(metric_share * cfg.epsilon, cfg.delta, 1.0, releases)
            sigma = joint_noise_multiplier(acc, rest, cfg.delta, q, planned, [(z, 1.0, releases)])
        else:
            sigma = acc.noise_multiplier(rest, cfg.delta, q, planned)
        before = [(sigma, q, planned)] + ([(z, 1.0, releases)] if releases and metric_share > 0 else [])
        if transitions:
            zt = release_noise_multiplier(acc, cfg.epsilon * (1.0 - pop_share), cfg.delta, before)
            before = before + [(zt, 1.0, 1)]
        if popularity:
            zp = release_noise_multiplier(acc, cfg.epsilon, cfg.delta, before)
        return cls(silo, cfg.accountant, cfg.epsilon, cfg.delta, sigma, q, planned, release_metrics=release_metrics,
                   metric_noise_multiplier=z, planned_releases=releases, popularity_noise_multiplier=zp,
                   transition_noise_multiplier=zt)

    def epsilon_of(self, history: History) -> float:
        """ε(δ) of a mechanism history under this state's accountant."""
        return accountants.create(self.accountant).epsilon(history, self.delta)

    @property
    def epsilon_spent(self) -> float:
        return self.epsilon_of(self.history)

    def epsilon_after(self, steps: int) -> float:
        """Cumulative ε if ``steps`` more steps ran at the calibrated noise."""
        return self.epsilon_of(self.history + [(self.noise_multiplier, self.sample_rate, steps)])

    def release_after(self, releases: int) -> float:
        """Cumulative ε if ``releases`` more Gaussian metric coordinates were released."""
        return self.epsilon_of(self.history + [(self.metric_noise_multiplier, 1.0, int(releases))])

    def record_release(self, releases: int) -> tuple[float, float, int]:
        """Add a Gaussian metric release of ``releases`` coordinates; returns its history entry."""
        entry = (self.metric_noise_multiplier, 1.0, int(releases))
        self.history = list(self.history) + [entry]
        return entry

    def record_popularity(self) -> tuple[float, float, int]:
        """Add the popularity histogram release; returns its history entry."""
        entry = (self.popularity_noise_multiplier, 1.0, 1)
        self.history = list(self.history) + [entry]
        return entry

    def record_transitions(self) -> tuple[float, float, int]:
        """Add the transition-count release; returns its history entry."""
        entry = (self.transition_noise_multiplier, 1.0, 1)
        self.history = list(self.history) + [entry]
        return entry

    def record_round(self, server_round: int, steps: int) -> tuple[float, float, int]:
        """Add a round of ``steps`` steps at the calibrated noise; returns its history entry."""
        step = (self.noise_multiplier, self.sample_rate, int(steps))
        self.history = list(self.history) + [step]
        self.rounds.append(server_round)
        return step

    def restore(self, run_rounds: list[Spending]) -> "PrivacyState":
        """Continue from this run's spending records (DP-SGD rounds, metric, popularity and
        transition releases, in ledger order: a restarted silo process).

        The noise was calibrated from the run config; a record made with other mechanism
        parameters means the configuration changed mid-run, which would silently break
        the privacy plan, so it is refused.
        """
        planned: dict[type, tuple[float, float, str, type[RuntimeError]]] = {  # kind → (σ, q, what, error)
            DpSgdRound: (self.noise_multiplier, self.sample_rate, "DP-SGD", RestoreMismatch),
            MetricRelease: (self.metric_noise_multiplier, 1.0, "metric release", RuntimeError),
            PopularityRelease: (self.popularity_noise_multiplier, 1.0, "popularity release", RestoreMismatch),
            TransitionRelease: (self.transition_noise_multiplier, 1.0, "transition release", RestoreMismatch),
        }
        for rec in run_rounds:
            sigma, q, _ = rec.mechanism
            want_sigma, want_q, what, error = planned[type(rec)]
            if not (math.isclose(sigma, want_sigma, rel_tol=1e-9) and math.isclose(q, want_q, rel_tol=1e-9)):
                raise error(f"silo {self.silo}: ledger {what} of round {rec.round} used σ={sigma:g}, q={q:g} but this "
                            f"run's configuration calibrates σ={want_sigma:g}, q={want_q:g}; refusing to continue")
        self.history = history_of(run_rounds)
        self.rounds = [int(r.round) for r in run_rounds if isinstance(r, DpSgdRound)]
        return self

    @property
    def accountant_label(self) -> str:
        return accountants.label(self.accountant)
