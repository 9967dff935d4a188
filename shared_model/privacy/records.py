"""Typed ledger records: what each kind of ledger line holds.

A record is a frozen dataclass registered under its ``kind``. On disk its fields are
dashed (``epsilon_round`` is the key ``epsilon-round``) next to ``"kind"``; a field whose
value is ``None`` is left off the line (optional fields, which older records may lack).

* :func:`write_record` is the one place a record is written (silo and server alike).
* :func:`parse_record` turns one line (a dict) back into its kind; an unknown kind, a
  missing or unknown field, or a value of the wrong type is a
  :class:`~shared_model.privacy.ledger.LedgerError` naming ``file:LINE``.

Adding a kind (a histogram release, a metric release, …): subclass :class:`Record`, set
``KIND``, decorate it with :func:`register`. Nothing else changes: the ledger stores
lines, and ε is computed from the records :func:`spending` returns (:class:`DpSgdRound`,
:class:`MetricRelease`, :class:`PopularityRelease` and :class:`TransitionRelease`), so a new kind spends nothing
until the accounting is taught about it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from shared_model.privacy.ledger import Ledger, LedgerError

#: Keys the ledger (hash chain), the server (where a silo's record came from) and the silo's
#: signature (:mod:`shared_model.privacy.ledger_signatures`) put around a record; they are
#: not the record's fields.
ENVELOPE = ("prev-sha256", "sha256", "silo-sha256", "node-id", "signature")

R = TypeVar("R", bound="Record")


@dataclasses.dataclass(frozen=True)
class Record:
    """Base of every record kind."""

    KIND: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The line's fields: ``kind`` plus every non-None field, dashed."""
        out: dict[str, Any] = {"kind": self.KIND}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name.replace("_", "-")] = value
        return out


KINDS: dict[str, type[Record]] = {}


def register(cls: type[R]) -> type[R]:
    """Class decorator: make ``cls`` (a :class:`Record` with a new ``KIND``) parseable."""
    if not cls.KIND or cls.KIND in KINDS:
        raise ValueError(f"record kind {cls.KIND!r} is empty or already registered")
    KINDS[cls.KIND] = cls
    return cls


@register
@dataclasses.dataclass(frozen=True)
class DpSgdRound(Record):
    """One round of DP-SGD on a silo: the mechanism (σ, q, steps) and the ε it spent."""

    KIND: ClassVar[str] = "dp-sgd-round"
    run_id: str
    silo: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_round: float
    epsilon_cumulative: float  # this run, after this round
    epsilon_budget: float
    epsilon_lifetime: float | None = None  # every run on the silo's ledger
    runs_on_ledger: int | None = None
    num_users: int | None = None
    model_sha256: str | None = None  # of the trainable arrays the silo sent
    time: str | None = None
    resumed_in: str | None = None  # the Flower run that trained this round, when it resumed ``run_id``

    @property
    def mechanism(self) -> tuple[float, float, int]:
        """``(σ, q, steps)``: this round's entry in an accountant history."""
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


@register
@dataclasses.dataclass(frozen=True)
class Refusal(Record):
    """A silo refused to train: what was asked, which rule refused it and why.

    ``rule`` names a policy rule (:mod:`shared_model.privacy.admission`: the request broke
    the silo's own policy, or did not parse) or a budget rule
    (:mod:`shared_model.privacy.budget`: the run or lifetime ε would be exceeded).
    ``request`` is the privacy-relevant part of the run config as JSON; ``policy`` and
    ``policy-sha256`` name the policy that decided. The mechanism fields are present for
    budget refusals only (a policy refusal comes before any calibration). A refusal spends
    nothing (no data was touched)."""

    KIND: ClassVar[str] = "refusal"
    run_id: str
    silo: str
    round: int
    rule: str
    reason: str
    steps: int | None = None  # requested
    sample_rate: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    accountant: str | None = None
    epsilon_cumulative: float | None = None  # this run, before the request
    epsilon_requested: float | None = None  # what the rule's ε would have become
    epsilon_limit: float | None = None  # the rule's limit
    epsilon_budget: float | None = None  # the run's budget
    request: str | None = None  # JSON: what the run config asked (shared_model.privacy.admission.requested)
    policy: str | None = None  # the policy file that decided
    policy_sha256: str | None = None
    time: str | None = None
    resumed_in: str | None = None  # the Flower run that asked, when it resumed ``run_id``


@register
@dataclasses.dataclass(frozen=True)
class MetricRelease(Record):
    """Metrics a silo released with the Gaussian mechanism (``release-metrics = "dp"``).

    ``names`` (comma-separated) are the released coordinates: sums over users of a per-user
    value clipped to ``[0, sensitivity]`` and counts of users (:mod:`shared_model.privacy.metric_release`).
    Each coordinate got Gaussian noise of standard deviation ``noise_multiplier × sensitivity``
    (the silo's secret randomness). To the accountant this is ``releases`` Gaussian
    mechanisms of noise multiplier ``noise_multiplier`` without sampling (q = 1); it composes
    with the silo's DP-SGD rounds, and ``epsilon-cumulative`` is the run's ε after it."""

    KIND: ClassVar[str] = "metric-release"
    run_id: str
    silo: str
    round: int
    phase: str  # "evaluate" | "train"
    names: str
    releases: int  # Gaussian mechanisms (coordinates) composed
    noise_multiplier: float
    sensitivity: float  # per-user bound of each coordinate
    delta: float
    accountant: str
    epsilon_release: float  # of this release alone
    epsilon_cumulative: float  # this run, after this release
    epsilon_budget: float
    public_counts: str | None = None  # counts treated as public (name=value, comma-separated)
    time: str | None = None

    @property
    def mechanism(self) -> tuple[float, float, int]:
        """``(σ, 1.0, releases)``: this release's entry in an accountant history."""
        return (float(self.noise_multiplier), 1.0, int(self.releases))


@register
@dataclasses.dataclass(frozen=True)
class PopularityRelease(Record):
    """A silo's item histogram released with the Gaussian mechanism (``popularity-prior``).

    Each training user counts their ``max-items`` most recent distinct items of the silo's
    platform, weight 1 each (L2 sensitivity ``sensitivity`` = √max-items); every one of the
    platform's ``items`` catalogue coordinates got Gaussian noise of standard deviation
    ``noise_multiplier × sensitivity`` (the silo's secret randomness;
    :mod:`shared_model.popularity`). To the accountant it is one Gaussian mechanism without
    sampling, ``(noise_multiplier, 1.0, 1)``, composed with the silo's DP-SGD rounds;
    ``epsilon-cumulative`` is the run's ε after it."""

    KIND: ClassVar[str] = "popularity-release"
    run_id: str
    silo: str
    round: int  # 0: released before the first round
    platform: str
    items: int  # catalogue coordinates released
    max_items: int
    noise_multiplier: float
    sensitivity: float
    delta: float
    accountant: str
    epsilon_release: float  # of this release alone
    epsilon_cumulative: float  # this run, after this release
    epsilon_budget: float
    users: int | None = None  # training users counted (public in this threat model)
    time: str | None = None

    @property
    def phase(self) -> str:
        """The phase of the server's records that holds the reply (``metrics.json``)."""
        return "popularity"

    @property
    def mechanism(self) -> tuple[float, float, int]:
        """``(σ, 1.0, 1)``: this release's entry in an accountant history."""
        return (float(self.noise_multiplier), 1.0, 1)


@register
@dataclasses.dataclass(frozen=True)
class TransitionRelease(Record):
    """A silo's item-transition counts released with the Gaussian mechanism (``transitions``).

    Each training user counts their ``max-pairs`` most recent distinct unordered pairs of
    consecutive different items, weight 1 each (L2 sensitivity ``sensitivity`` = √max-pairs);
    every one of the ``pairs`` public candidate pairs the server sent got Gaussian noise of
    standard deviation ``noise_multiplier × sensitivity`` (the silo's secret randomness;
    :mod:`shared_model.transitions`). To the accountant it is one Gaussian mechanism without
    sampling, ``(noise_multiplier, 1.0, 1)``, composed with the silo's DP-SGD rounds;
    ``epsilon-cumulative`` is the run's ε after it."""

    KIND: ClassVar[str] = "transition-release"
    run_id: str
    silo: str
    round: int  # 0: released before the first round
    platform: str
    pairs: int  # candidate pairs released (coordinates)
    max_pairs: int
    noise_multiplier: float
    sensitivity: float
    delta: float
    accountant: str
    epsilon_release: float  # of this release alone
    epsilon_cumulative: float  # this run, after this release
    epsilon_budget: float
    users: int | None = None  # training users counted (public in this threat model)
    time: str | None = None

    @property
    def phase(self) -> str:
        """The phase of the server's records that holds the reply (``metrics.json``)."""
        return "transitions"

    @property
    def mechanism(self) -> tuple[float, float, int]:
        """``(σ, 1.0, 1)``: this release's entry in an accountant history."""
        return (float(self.noise_multiplier), 1.0, 1)


@register
@dataclasses.dataclass(frozen=True)
class PlainRelease(Record):
    """Numbers a silo sent WITHOUT noise (``release-metrics = "plain"``): declared outside ε.
    Spends nothing in the accounting, because nothing protects them."""

    KIND: ClassVar[str] = "plain-release"
    run_id: str
    silo: str
    round: int
    phase: str
    names: str  # comma-separated metric names sent unnoised
    policy: str | None = None  # the mode's source, e.g. "policy release-metrics = plain"
    time: str | None = None


def write_record(ledger: Ledger, record: Record, envelope: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Append ``record`` (plus ``envelope`` keys, see :data:`ENVELOPE`) to ``ledger``;
    returns the line as written, chain fields included."""
    extra = dict(envelope or {})
    bad = set(extra) - set(ENVELOPE) | ({"prev-sha256", "sha256"} & set(extra))
    if bad:
        raise ValueError(f"not envelope keys a writer may set: {sorted(bad)}")
    return ledger.append({**record.to_dict(), **extra})


def parse_record(raw: Mapping[str, Any], path: str | Path = "record", line: int = 0) -> Record:
    """The typed record of one ledger line; :class:`LedgerError` ``path:line: reason`` if it is not one."""
    kind = raw.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise LedgerError(Path(path), line, f"unknown record kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    hints = typing.get_type_hints(cls)
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields) - {"kind", *ENVELOPE})
    if unknown:
        raise LedgerError(Path(path), line, f"{kind} record has unknown field(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key, f in fields.items():
        if key not in raw or raw[key] is None:
            if f.default is dataclasses.MISSING:
                raise LedgerError(Path(path), line, f"{kind} record lacks field {key}")
            continue
        try:
            values[f.name] = _typed(hints[f.name], raw[key])
        except TypeError as exc:
            raise LedgerError(Path(path), line, f"{kind} record field {key}: {exc}") from None
    return cls(**values)


def _typed(hint: Any, value: Any) -> Any:
    kinds = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    kind = kinds[0]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise TypeError(f"expected {kind.__name__}, got {value!r}")


def read_records(ledger: Ledger) -> list[Record]:
    """Every record on ``ledger``, verified and typed, in ledger order."""
    return [parse_record(raw, ledger.path, number) for number, raw in enumerate(ledger.read(), start=1)]


def dp_rounds(records: Iterable[Record]) -> list[DpSgdRound]:
    """The DP-SGD round records, in order: the only records that spend ε."""
    return [r for r in records if isinstance(r, DpSgdRound)]


Spending = DpSgdRound | MetricRelease | PopularityRelease | TransitionRelease


def spending(records: Iterable[Record]) -> list[Spending]:
    """The records that spend ε (DP-SGD rounds, Gaussian metric, popularity and transition
    releases), in ledger order."""
    return [r for r in records if isinstance(r, (DpSgdRound, MetricRelease, PopularityRelease, TransitionRelease))]


def refusals(records: Iterable[Record]) -> list[Refusal]:
    return [r for r in records if isinstance(r, Refusal)]


def of_run(records: Iterable[R], run_id: int | str, silo: str | None = None) -> list[R]:
    """The records of one run (and one silo, when given), in order."""
    return [r for r in records if str(getattr(r, "run_id", None)) == str(run_id)
            and (silo is None or getattr(r, "silo", None) == silo)]


def history_of(rounds: Iterable[Spending]) -> list[tuple[float, float, int]]:
    """Accountant history ``[(σ, q, steps), …]`` of spending records (:func:`spending`), in order."""
    return [r.mechanism for r in rounds]


def compact(history: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The same composition with equal mechanisms ``(σ, q)`` merged (their steps summed), in
    order of first appearance. Composition is commutative (RDP orders add; privacy loss
    distributions convolve), so ε is unchanged; the accountants' cost grows with the number
    of distinct entries, and DP-SGD rounds interleaved with metric releases would otherwise
    each be one."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items()]
