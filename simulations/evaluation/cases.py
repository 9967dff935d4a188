"""The held-out cases the evaluation scores, by group (docs/evaluation.md).

* :func:`platform_cases`: the held-out examples with a target on a platform, from every silo
  that holds it (a region silo's history mixes platforms);
* :func:`switch_cases`: those whose last history event is on another platform (``switch``);
* :func:`cross_cases`: cold start ``A->B``, only the user's earlier events on A as input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared_model.examples import DEFAULT_K, eval_examples, migration_defined
from shared_model.schema import Catalogue, Event, Silo

#: the group of cases whose last history event is on another platform than the target
SWITCH = "switch"


@dataclass(frozen=True)
class Case:
    """One held-out example: input history, target on ``platform``.

    ``source``: where the history comes from — a platform (a platform silo's history, or a
    cold-start group's events on that platform) or, for a region silo, its platforms joined
    with ``+`` (:func:`history_source`; a mixed history)."""

    user_id: str
    platform: str
    source: str
    history: tuple[Event, ...]
    target: Event
    target_category: str | None
    migrating: bool
    migration_defined: bool


def history_source(silo: Silo) -> str:
    """A :attr:`Case.source`: the silo's platform, or its platforms joined with ``+`` (a region silo)."""
    return "+".join(silo.platforms)


def platform_cases(catalogue: Catalogue, silos: Mapping[str, Silo], platform: str, split: str,
                   k: int = DEFAULT_K) -> list[Case]:
    """Held-out examples of ``split`` with a target on ``platform``, from every silo that holds
    it (silos in name order); the input is the silo's whole history before the target (a region
    silo's mixes platforms)."""
    out = []
    for name in sorted(silos):
        silo = silos[name]
        if platform not in silo.platforms:
            continue
        source = history_source(silo)
        for ex in eval_examples(silo, catalogue, split, k):
            if catalogue.items[ex.target.item_id].platform != platform:
                continue
            out.append(Case(ex.user_id, platform, source, ex.history, ex.target, ex.target_category, ex.migrating,
                            migration_defined(ex.history, ex.target, catalogue)))
    return out


def is_switch(case: Case, catalogue: Catalogue) -> bool:
    """Whether the history is non-empty and its last event is on another platform than the target."""
    return bool(case.history) and catalogue.items[case.history[-1].item_id].platform != case.platform


def switch_cases(catalogue: Catalogue, cases: Sequence[Case]) -> list[Case]:
    """The ``switch`` cases among ``cases`` (:func:`is_switch`), in order."""
    return [c for c in cases if is_switch(c, catalogue)]


def cross_cases(catalogue: Catalogue, silos: Mapping[str, Silo], source: str, target: str, split: str) -> list[Case]:
    """Held-out users of ``split`` with a target on ``target`` whose input is only their earlier
    ``source`` events: events whose item is on ``source``, from every silo, same user id."""
    src_events: dict[str, list[Event]] = {}
    for silo in silos.values():
        if source not in silo.platforms:
            continue
        for u, h in silo.histories.items():
            src_events.setdefault(u, []).extend(e for e in h if catalogue.items[e.item_id].platform == source)
    out = []
    for case in platform_cases(catalogue, silos, target, split):
        hist = sorted((e for e in src_events.get(case.user_id, ()) if e.order < case.target.order), key=lambda e: e.order)
        if hist:
            out.append(Case(case.user_id, target, source, tuple(hist), case.target, case.target_category, False, False))
    return out
