"""The accountant interface: ε of a mechanism history and noise calibration, by Opacus.

A history is ``[(σ, q, steps), …]``, exactly Opacus's ``IAccountant.history``. Each
accountant file only names its Opacus class; the math is Opacus's.
"""

from __future__ import annotations

import functools
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

        return _epsilon(type(self), tuple(compact(history)), float(delta))

    def noise_multiplier(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        """σ such that ``steps`` Poisson-sampled steps at rate ``sample_rate`` spend ≤ ε (Opacus)."""
        return _noise_multiplier(self.name, float(target_epsilon), float(delta), float(sample_rate), int(steps))


# Memoised, as pure functions of their arguments: Opacus's RDP at fractional orders takes
# seconds per call on 2 busy cores, and a simulation process serves many silos with the same
# (σ, q, steps) — without this each of 100 simulated silos recalibrated the same σ
# (docs/performance.md, section 5, measures it).
@functools.lru_cache(maxsize=4096)
def _epsilon(kind: type[Accountant], history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    acc = kind.opacus_class()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def _noise_multiplier(name: str, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=name))
