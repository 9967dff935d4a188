"""The accountant interface: ε of a mechanism history and noise calibration, by Opacus.

A history is ``[(σ, q, steps), …]``, exactly Opacus's ``IAccountant.history``. Each
accountant file only names its Opacus class; the math is Opacus's.
"""

from __future__ import annotations

from typing import ClassVar

from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

History = list[tuple[float, float, int]]


class Accountant:
    """One Opacus accountant: ``name`` as Opacus spells it, ``label`` for people."""

    name: ClassVar[str]
    label: ClassVar[str]
    opacus_class: ClassVar[type[IAccountant]]

    def epsilon(self, history: History, delta: float) -> float:
        """ε(δ) of ``history`` (0 for an empty one)."""
        if not history:
            return 0.0
        from shared_model.privacy.records import compact

        acc = self.opacus_class()
        acc.history = compact(history)
        return float(acc.get_epsilon(delta=delta))

    def noise_multiplier(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        """σ such that ``steps`` Poisson-sampled steps at rate ``sample_rate`` spend ≤ ε (Opacus)."""
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=self.name))
