"""A silo's accountant state for one run: the noise calibrated once for the whole run and
the accountant's history so far, so ε composes over rounds.

Noise is calibrated once from the *total* budget (ε_total, δ) for the planned
``num-server-rounds × local-steps`` Poisson-sampled steps, so the cumulative ε after the
last planned step is ≤ ε_total (Opacus ``get_noise_multiplier``). A restarted silo
rebuilds the history from its ledger's DP-SGD round records of the run (:meth:`restore`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared_model.config import RunConfig
from shared_model.privacy import accountants
from shared_model.privacy.records import DpSgdRound, history_of

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

    @classmethod
    def calibrate(cls, silo: str, cfg: RunConfig, num_users: int) -> "PrivacyState":
        q = sample_rate_for(num_users, cfg.batch_size)
        planned = cfg.num_server_rounds * cfg.local_steps
        sigma = accountants.create(cfg.accountant).noise_multiplier(cfg.epsilon, cfg.delta, q, planned)
        return cls(silo, cfg.accountant, cfg.epsilon, cfg.delta, sigma, q, planned)

    def epsilon_of(self, history: History) -> float:
        """ε(δ) of a mechanism history under this state's accountant."""
        return accountants.create(self.accountant).epsilon(history, self.delta)

    @property
    def epsilon_spent(self) -> float:
        return self.epsilon_of(self.history)

    def epsilon_after(self, steps: int) -> float:
        """Cumulative ε if ``steps`` more steps ran at the calibrated noise."""
        return self.epsilon_of(self.history + [(self.noise_multiplier, self.sample_rate, steps)])

    def record_round(self, server_round: int, steps: int) -> tuple[float, float, int]:
        """Add a round of ``steps`` steps at the calibrated noise; returns its history entry."""
        step = (self.noise_multiplier, self.sample_rate, int(steps))
        self.history = list(self.history) + [step]
        self.rounds.append(server_round)
        return step

    def restore(self, run_rounds: list[DpSgdRound]) -> "PrivacyState":
        """Continue from this run's DP-SGD round records (a restarted silo process).

        The noise was calibrated from the run config; a record made with other mechanism
        parameters means the configuration changed mid-run, which would silently break
        the privacy plan, so it is refused.
        """
        for rec in run_rounds:
            sigma, q = float(rec.noise_multiplier), float(rec.sample_rate)
            if not (math.isclose(sigma, self.noise_multiplier, rel_tol=1e-9) and math.isclose(q, self.sample_rate, rel_tol=1e-9)):
                raise RestoreMismatch(
                    f"silo {self.silo}: ledger round {rec.round} used σ={sigma:g}, q={q:g} but this run's "
                    f"configuration calibrates σ={self.noise_multiplier:g}, q={self.sample_rate:g}; refusing to continue"
                )
        self.history = history_of(run_rounds)
        self.rounds = [int(r.round) for r in run_rounds]
        return self

    @property
    def accountant_label(self) -> str:
        return accountants.label(self.accountant)
