"""The budget rules: may a silo run ``steps`` more DP-SGD steps?

Two rules, checked in order; the first that fails refuses, as a :class:`BudgetRefusal`
(rule name, reason, the ε it would have reached, the limit):

``run-budget``            the run's cumulative ε (this run's accountant state) would exceed
                          the run budget ``epsilon``;
``silo-lifetime-budget``  the silo's ε over every run on its ledger would exceed
                          ``silo-lifetime-epsilon`` (when that is > 0).

DP-SGD round records and Gaussian metric, popularity and transition releases spend ε
(``records.spending``); refusals and other kinds on the ledger are ignored. :func:`check_entry`
applies both rules to any mechanism entry ``(σ, q, n)`` (a metric release: ``(z, 1.0,
coordinates)``; a popularity or transition release: ``(z, 1.0, 1)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shared_model.privacy.records import Record, history_of, spending
from shared_model.privacy.state import PrivacyState

TOLERANCE = 1e-6
RUN_BUDGET = "run-budget"
LIFETIME_BUDGET = "silo-lifetime-budget"


@dataclass(frozen=True)
class BudgetRefusal:
    rule: str
    reason: str
    epsilon_requested: float  # what the rule's ε would have become
    epsilon_limit: float


def can_train(privacy: PrivacyState, steps: int, tolerance: float = TOLERANCE) -> bool:
    """True when ``steps`` more steps keep this run's cumulative ε within its budget."""
    return privacy.epsilon_after(steps) <= privacy.epsilon_budget + tolerance


def lifetime_epsilon(privacy: PrivacyState, records: Iterable[Record],
                     extra: Iterable[tuple[float, float, int]] = ()) -> float:
    """ε(δ) over every run's spending records in ``records`` (plus ``extra`` entries), one accountant."""
    return privacy.epsilon_of(history_of(spending(records)) + list(extra))


def check_entry(privacy: PrivacyState, entry: tuple[float, float, int], what: str, lifetime_cap: float,
                records: Iterable[Record], ledger: str | Path = "ledger") -> BudgetRefusal | None:
    """The first rule that refuses the mechanism ``entry`` (``what`` names it), or None."""
    after = privacy.epsilon_of(privacy.history + [entry])
    if after > privacy.epsilon_budget + TOLERANCE:
        return BudgetRefusal(RUN_BUDGET, f"{what} would take ε from {privacy.epsilon_spent:.4g} to {after:.4g} > "
                             f"budget {privacy.epsilon_budget:g} (δ={privacy.delta:g}, {privacy.accountant_label})",
                             after, privacy.epsilon_budget)
    if lifetime_cap > 0:
        life = lifetime_epsilon(privacy, records, [entry])
        if life > lifetime_cap + TOLERANCE:
            return BudgetRefusal(LIFETIME_BUDGET, f"{what} would take the silo's lifetime ε over all runs on "
                                 f"{ledger} to {life:.4g} > silo-lifetime-epsilon {lifetime_cap:g} "
                                 f"(δ={privacy.delta:g}, {privacy.accountant_label})", life, lifetime_cap)
    return None


def check(privacy: PrivacyState, steps: int, lifetime_cap: float, records: Iterable[Record],
          ledger: str | Path = "ledger") -> BudgetRefusal | None:
    """The first rule that refuses ``steps`` more steps, or None when the silo may train.

    ``records`` are every record on the silo's ledger (at ``ledger``, named in the reason)."""
    if not can_train(privacy, steps):
        after = privacy.epsilon_after(steps)
        return BudgetRefusal(RUN_BUDGET,
                             f"{steps} more steps would take ε from {privacy.epsilon_spent:.4g} to "
                             f"{after:.4g} > budget {privacy.epsilon_budget:g} "
                             f"(δ={privacy.delta:g}, {privacy.accountant_label})", after, privacy.epsilon_budget)
    if lifetime_cap > 0:
        step = (privacy.noise_multiplier, privacy.sample_rate, steps)
        after = lifetime_epsilon(privacy, records, [step])
        if after > lifetime_cap + TOLERANCE:
            return BudgetRefusal(LIFETIME_BUDGET,
                                 f"{steps} more steps would take the silo's lifetime ε over all runs on "
                                 f"{ledger} to {after:.4g} > silo-lifetime-epsilon {lifetime_cap:g} "
                                 f"(δ={privacy.delta:g}, {privacy.accountant_label})", after, lifetime_cap)
    return None
