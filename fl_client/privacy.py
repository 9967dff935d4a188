"""A silo's privacy state: the noise calibrated once for the whole run, and the
accountant's history, kept in one place (``Context.state``) so ε composes over rounds.

Noise is calibrated once from the *total* budget (ε_total, δ) for the planned
``num-server-rounds × local-steps`` Poisson-sampled steps, so the cumulative ε after the
last planned step is ≤ ε_total (Opacus ``get_noise_multiplier``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flwr.app import ConfigRecord
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from shared_model.config import RunConfig

STATE_KEY = "fedshift-privacy"
ACCOUNTANT_NAMES = {"rdp": "Opacus RDP", "prv": "Opacus PRV", "gdp": "Opacus GDP"}


def sample_rate_for(num_users: int, batch_size: int) -> float:
    """Poisson sample rate exactly as Opacus's DPDataLoader derives it: 1 / #batches."""
    return 1.0 / math.ceil(num_users / max(1, min(batch_size, num_users)))


def ledger_history(records: list[dict]) -> list[tuple[float, float, int]]:
    """Accountant history ``[(σ, q, steps), …]`` of ledger records, in ledger order."""
    return [(float(r["noise-multiplier"]), float(r["sample-rate"]), int(r["steps"])) for r in records]


def epsilon_of_history(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """ε(δ) of a history under an Opacus accountant (``rdp`` | ``prv`` | ``gdp``)."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


@dataclass
class PrivacyState:
    silo: str
    accountant: str
    epsilon_budget: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    @classmethod
    def calibrate(cls, silo: str, cfg: RunConfig, num_users: int) -> "PrivacyState":
        q = sample_rate_for(num_users, cfg.batch_size)
        planned = cfg.num_server_rounds * cfg.local_steps
        sigma = get_noise_multiplier(
            target_epsilon=cfg.epsilon,
            target_delta=cfg.delta,
            sample_rate=q,
            steps=planned,
            accountant=cfg.accountant,
        )
        return cls(silo, cfg.accountant, cfg.epsilon, cfg.delta, float(sigma), q, planned)

    def epsilon_of(self, history: list[tuple[float, float, int]]) -> float:
        """ε(δ) of a mechanism history under this state's accountant."""
        return epsilon_of_history(self.accountant, history, self.delta)

    @property
    def epsilon_spent(self) -> float:
        return self.epsilon_of(self.history)

    def epsilon_after(self, steps: int) -> float:
        """Cumulative ε if ``steps`` more steps ran at the calibrated noise."""
        return self.epsilon_of(self.history + [(self.noise_multiplier, self.sample_rate, steps)])

    def can_train(self, steps: int, tolerance: float = 1e-6) -> bool:
        """True when ``steps`` more steps keep cumulative ε within the budget."""
        return self.epsilon_after(steps) <= self.epsilon_budget + tolerance

    def restore(self, run_records: list[dict]) -> "PrivacyState":
        """Continue from this run's ledger records (a restarted silo process).

        The noise was calibrated from the run config; a record made with other mechanism
        parameters means the configuration changed mid-run, which would silently break
        the privacy plan, so it is refused.
        """
        for rec in run_records:
            sigma, q = float(rec["noise-multiplier"]), float(rec["sample-rate"])
            if not (math.isclose(sigma, self.noise_multiplier, rel_tol=1e-9) and math.isclose(q, self.sample_rate, rel_tol=1e-9)):
                raise RuntimeError(
                    f"silo {self.silo}: ledger round {rec.get('round')} used σ={sigma:g}, q={q:g} but this run's "
                    f"configuration calibrates σ={self.noise_multiplier:g}, q={self.sample_rate:g}; refusing to continue"
                )
        self.history = ledger_history(run_records)
        self.rounds = [int(r["round"]) for r in run_records]
        return self

    @property
    def accountant_label(self) -> str:
        return ACCOUNTANT_NAMES.get(self.accountant, self.accountant)

    # ---- Context.state round trip
    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "silo": self.silo,
                "accountant": self.accountant,
                "epsilon-budget": self.epsilon_budget,
                "delta": self.delta,
                "noise-multiplier": self.noise_multiplier,
                "sample-rate": self.sample_rate,
                "planned-steps": self.planned_steps,
                "history-sigma": [float(h[0]) for h in self.history],
                "history-q": [float(h[1]) for h in self.history],
                "history-steps": [int(h[2]) for h in self.history],
                "rounds": [int(r) for r in self.rounds],
            }
        )

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> "PrivacyState":
        history = list(
            zip(
                [float(x) for x in rec.get("history-sigma", [])],
                [float(x) for x in rec.get("history-q", [])],
                [int(x) for x in rec.get("history-steps", [])],
            )
        )
        return cls(
            silo=str(rec["silo"]),
            accountant=str(rec["accountant"]),
            epsilon_budget=float(rec["epsilon-budget"]),
            delta=float(rec["delta"]),
            noise_multiplier=float(rec["noise-multiplier"]),
            sample_rate=float(rec["sample-rate"]),
            planned_steps=int(rec["planned-steps"]),
            history=history,
            rounds=[int(r) for r in rec.get("rounds", [])],
        )
