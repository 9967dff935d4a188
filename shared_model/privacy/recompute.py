"""Recompute ε from ledger mechanism parameters with two independent implementations.

* Opacus (the accountant the ledger names; the training code's own library, but called
  here through its own classes, never through the training bookkeeping in
  ``shared_model.privacy.accountants`` / ``state``), and
* Google's ``dp-accounting``: RDP (``RdpAccountant``) and PLD (``PLDAccountant``) over
  ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` self-composed ``steps`` times.

Same-accountant agreement (Opacus RDP vs dp-accounting RDP) is checked on the *integer*
orders of Opacus's default α grid: both libraries evaluate integer orders in closed form,
while their fractional-order series differ slightly (dp-accounting also drops orders whose
series does not converge), which alone moves ε by up to ~1e-2 at large ε.

Histories are :func:`~shared_model.privacy.records.compact`-ed first (equal mechanisms
merged: composition is commutative), so a ledger of interleaved DP-SGD rounds and metric
releases costs two accountant entries, not one per record.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from shared_model.privacy.records import compact

History = list[tuple[float, float, int]]
#: The accountants a ledger may name: (label, Opacus class).
OPACUS: dict[str, tuple[str, type[IAccountant]]] = {
    "rdp": ("Opacus RDP", RDPAccountant),
    "prv": ("Opacus PRV", PRVAccountant),
    "gdp": ("Opacus GDP", GaussianAccountant),
}
OPACUS_ALPHAS: list[float] = list(RDPAccountant.DEFAULT_ALPHAS)
INTEGER_ORDERS: list[float] = sorted({float(a) for a in OPACUS_ALPHAS if float(a).is_integer()})


def dp_event(history: History) -> dp_accounting.DpEvent:
    """The history as one dp-accounting event: a heterogeneous composition of DP-SGD steps
    (Poisson-sampled Gaussian, q < 1) and Gaussian metric releases (q = 1: no sampling)."""
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(s) if q >= 1.0 else
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), int(n))
        for s, q, n in compact(history)
    ]
    return dp_accounting.ComposedDpEvent(events)


def dpacc_rdp(history: History, delta: float, orders: list[float] | None = None) -> float:
    if not history:
        return 0.0
    acc = RdpAccountant(orders=orders or OPACUS_ALPHAS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            acc.compose(dp_event(history))
        finally:
            logging.disable(logging.NOTSET)
    return float(acc.get_epsilon(delta))


def dpacc_pld(history: History, delta: float) -> float:
    if not history:
        return 0.0
    acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_event(history))
    return float(acc.get_epsilon(delta))


def opacus_rdp(history: History, delta: float, alphas: list[float] | None = None) -> float:
    if not history:
        return 0.0
    merged: list[tuple[float, float, int]] = []  # RDP is linear in steps: merge consecutive equal mechanisms
    for s, q, n in history:
        if merged and merged[-1][:2] == (float(s), float(q)):
            merged[-1] = (float(s), float(q), merged[-1][2] + int(n))
        else:
            merged.append((float(s), float(q), int(n)))
    return _opacus_rdp(tuple(merged), float(delta), None if alphas is None else tuple(alphas))


@functools.lru_cache(maxsize=1024)
def _opacus_rdp(history: tuple[tuple[float, float, int], ...], delta: float, alphas: tuple[float, ...] | None) -> float:
    """Memoised: an audit asks for the same history several times (each record's prefix, the
    lifetime, every silo of a run), and Opacus's fractional orders take about a second each."""
    acc = RDPAccountant()
    acc.history = compact(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta, alphas=None if alphas is None else list(alphas)))


def opacus_epsilon(accountant: str, history: History, delta: float) -> float:
    """ε(δ) by the Opacus accountant the ledger names (``rdp`` | ``prv`` | ``gdp``)."""
    if accountant not in OPACUS:
        raise ValueError(f"unknown accountant {accountant!r} (expected one of {', '.join(OPACUS)})")
    if accountant == "rdp":
        return opacus_rdp(history, delta)
    if not history:
        return 0.0
    acc = OPACUS[accountant][1]()
    acc.history = compact(history)
    return float(acc.get_epsilon(delta=delta))


def label(accountant: str) -> str:
    return OPACUS[accountant][0] if accountant in OPACUS else accountant


@dataclass
class Recomputed:
    """ε(δ) of one history by every accountant, named."""

    delta: float
    ledger_accountant: str
    opacus_ledger_accountant: float  # Opacus, the accountant the ledger names
    opacus_rdp_int: float  # Opacus RDP, integer orders
    dpacc_rdp_int: float  # dp-accounting RDP, the same integer orders
    spread: dict[str, float] = field(default_factory=dict)  # cross-accountant figures

    @property
    def same_accountant_diff(self) -> float:
        return abs(self.opacus_rdp_int - self.dpacc_rdp_int)

    @property
    def cross_spread(self) -> float:
        vals = list(self.spread.values())
        return max(vals) - min(vals) if vals else 0.0


def recompute(history: History, delta: float, accountant: str) -> Recomputed:
    rdp_default = opacus_rdp(history, delta)
    return Recomputed(
        delta=delta,
        ledger_accountant=accountant,
        opacus_ledger_accountant=rdp_default if accountant == "rdp" else opacus_epsilon(accountant, history, delta),
        opacus_rdp_int=opacus_rdp(history, delta, alphas=INTEGER_ORDERS),
        dpacc_rdp_int=dpacc_rdp(history, delta, orders=INTEGER_ORDERS),
        spread={
            "Opacus RDP (default α)": rdp_default,
            "dp-accounting RDP (Opacus α)": dpacc_rdp(history, delta),
            "dp-accounting PLD": dpacc_pld(history, delta),
        },
    )
