"""The migration probe: user-level propensity signals (hand-computed values) and the
migration-aware loss term of the ``history-logit`` baseline."""

from __future__ import annotations

import pytest

from shared_model.schema import Catalogue, Event, Item, Silo
from simulations.evaluation import Case, HistoryLogit, TrainStats
from simulations.evaluation.migration_probe import propensity_signals


def _catalogue() -> Catalogue:
    return Catalogue({f"{c}{i}": Item(f"{c}{i}", "p", f"{c} item {i}", ("top", c)) for c in "abcd" for i in range(3)})


def test_propensity_signals_hand_computed() -> None:
    cat = _catalogue()
    # categories a a b a c c: with k=2, positions 1..5 have recent sets {a} {a} {a,b} {b,a} {a,c}
    # moves: a∈{a} no, b∉{a} yes, a∈{a,b} no, c∉{b,a} yes, c∈{a,c} no → 2 of 5 → (2+½)/(5+1)
    seq = ["a0", "a1", "b0", "a2", "c0", "c1"]
    history = [Event("u", item, t) for t, item in enumerate(seq)]
    s = propensity_signals(history, cat, k=2)
    assert s["past-migration-rate"] == pytest.approx(2.5 / 6)
    assert s["distinct-share"] == pytest.approx(3 / 6)
    assert s["short-streak"] == -2.0
    assert s["history-length"] == 6.0


def test_migration_weight_moves_mass_to_where_migrating_users_go() -> None:
    cat = _catalogue()
    histories, split = {}, {}
    for i in range(20):  # stayers in b make b's bias large
        histories[f"s{i}"] = [Event(f"s{i}", it, t) for t, it in enumerate(["b0", "b1", "b2"])]
    for i in range(10):  # users who leave a go to d
        histories[f"m{i}"] = [Event(f"m{i}", it, t) for t, it in enumerate(["a0", "a1", "d0"])]
    for i in range(10):  # and a-stayers
        histories[f"a{i}"] = [Event(f"a{i}", it, t) for t, it in enumerate(["a0", "a1", "a2"])]
    split = {u: "train" for u in histories}
    silos = {"p-r0": Silo("p-r0", "p", split, histories)}
    stats = TrainStats(cat, silos)
    case = [Case("t", "p", "p", (Event("t", "a0", 0), Event("t", "a1", 1)), Event("t", "c0", 2), "c", True, True)]
    b, d = stats.cat_index["b"], stats.cat_index["d"]
    plain = HistoryLogit(stats, silos, k=2, cuts=2).distributions(case, "p")[0]
    aware = HistoryLogit(stats, silos, k=2, cuts=2, migration_weight=3.0).distributions(case, "p")[0]
    assert HistoryLogit(stats, silos, k=2, cuts=1, migration_weight=3.0).name == "history-logit-mig3"
    # among the categories outside the recent {a}: the aware fit ranks d (where movers go) higher vs b
    assert aware[d] / aware[b] > plain[d] / plain[b]
