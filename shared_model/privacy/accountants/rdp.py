"""Opacus's Rényi-DP accountant (the default).

ε of a history is Opacus's ``RDPAccountant.get_privacy_spent``: the sum of each mechanism's
RDP curve at Opacus's default orders, converted to (ε, δ) once. Each ``(σ, q, steps)`` curve
is memoised, so a calibration that varies one mechanism of a history (the popularity
release's noise, :func:`shared_model.privacy.state.release_noise_multiplier`) recomputes only
that one, not the subsampled DP-SGD part at fractional orders.
"""

from __future__ import annotations

import functools

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from shared_model.privacy.accountants.base import Accountant, History


class Rdp(Accountant):
    name = "rdp"
    label = "Opacus RDP"
    opacus_class = RDPAccountant

    def epsilon(self, history: History, delta: float) -> float:
        if not history:
            return 0.0
        from shared_model.privacy.records import compact

        rdp = sum(_curve(float(sigma), float(q), int(steps)) for sigma, q, steps in compact(history))
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=float(delta))
        return float(eps)


@functools.lru_cache(maxsize=4096)
def _curve(sigma: float, q: float, steps: int) -> np.ndarray:
    curve = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                orders=RDPAccountant.DEFAULT_ALPHAS), dtype=float)
    curve.flags.writeable = False  # shared by every caller of the cache
    return curve
