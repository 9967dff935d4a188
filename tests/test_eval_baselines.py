"""Baselines and the evaluation harness on a hand-built two-platform dataset."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.schema import Catalogue, Event, Item, Silo
from simulations.baselines import CategoryMarkov, ItemCooccurrence, MostPopular, TrainStats
from simulations.evaluation import cross_cases, evaluate, per_user, platform_cases


def _ev(u: str, seq: list[tuple[str, int]]) -> list[Event]:
    return [Event(u, i, o) for i, o in seq]


@pytest.fixture()
def toy() -> tuple[Catalogue, dict[str, Silo]]:
    items = {
        "p1": Item("p1", "p", "pen one", ("top", "x")), "p2": Item("p2", "p", "pen two", ("top", "x")),
        "p3": Item("p3", "p", "pad one", ("top", "y")), "p4": Item("p4", "p", "pad two", ("top", "y")),
        "q1": Item("q1", "q", "quill", ("top", "z")), "q2": Item("q2", "q", "quire", ("top", "w")),
    }
    cat = Catalogue(items)
    sp = Silo("p-r0", "p", {"u1": "train", "u2": "train", "u3": "train", "t1": "test"}, {
        "u1": _ev("u1", [("p1", 0), ("p3", 2)]),
        "u2": _ev("u2", [("p1", 0), ("p2", 2), ("p3", 4)]),
        "u3": _ev("u3", [("p3", 0), ("p4", 2)]),
        "t1": _ev("t1", [("p1", 0), ("p2", 2)]),
    })
    sq = Silo("q-r0", "q", {"u1": "train", "u2": "train", "t1": "test"}, {
        "u1": _ev("u1", [("q1", 1)]),
        "u2": _ev("u2", [("q2", 3)]),
        "t1": _ev("t1", [("q1", 1), ("q2", 3)]),
    })
    return cat, {"p-r0": sp, "q-r0": sq}


def test_train_counts_and_majority_class(toy) -> None:
    cat, silos = toy
    s = TrainStats(cat, silos)
    assert s.categories == ["w", "x", "y", "z"]
    assert s.item_counts[s.platform_cols["p"]].tolist() == [2, 1, 3, 1]  # t1 (test) not counted
    assert s.cat_freq["p"] == pytest.approx([0, 3 / 7, 4 / 7, 0], abs=1e-5)
    # within p: x→y (u1), x→x, x→y (u2), y→y (u3)
    assert s.transitions[("p", "p")][1].tolist() == [0, 1, 2, 0]
    assert s.transitions[("p", "p")][2].tolist() == [0, 0, 1, 0]
    # q→p: last q event before each p event: u1 p3 after q1 (z→y); u2 p3 after q2 (w→y)
    t = s.transitions[("q", "p")]
    assert t[3].tolist() == [0, 0, 1, 0] and t[0].tolist() == [0, 0, 1, 0]


def test_baseline_ranks_and_categories_hand_computed(toy) -> None:
    cat, silos = toy
    stats = TrainStats(cat, silos)
    cases = platform_cases(cat, silos, "p", "test")
    assert [(c.user_id, [e.item_id for e in c.history], c.target.item_id) for c in cases] == [("t1", ["p1"], "p2")]
    cats = stats.categories
    # most popular: p3 (3), then p2 and p4 tie at 1 (ties count against the target), p1 excluded → rank 2
    pop = per_user(MostPopular(stats), cases, "p", cat, cats)
    assert pop["rank"].tolist() == [2]
    assert pop["acc1"].tolist() == [0.0] and pop["acc3"].tolist() == [1.0]  # majority class y; target x
    # Markov from x: counts (x 1, y 2) + platform frequency (3/7, 4/7) → y first: p3, p4, then p2
    mk = CategoryMarkov(stats)
    probs = mk.distributions(cases, "p")[0]
    assert probs == pytest.approx(np.array([0, 1 + 3 / 7, 2 + 4 / 7, 0]) / 4, abs=1e-5)
    assert per_user(mk, cases, "p", cat, cats)["rank"].tolist() == [2]
    # co-occurrence with p1 over merged train histories: p2 1 (u2), p3 2 (u1, u2), p4 0 → p2 second
    co = ItemCooccurrence(stats)
    scores, cprobs = co.predict(cases, "p")
    assert np.floor(scores[0]).tolist() == [0, 1, 2, 0]
    assert per_user(co, cases, "p", cat, cats)["rank"].tolist() == [1]
    assert cprobs[0].argmax() == 2 and cprobs[0][[0, 3]].tolist() == [0, 0]


def test_cross_platform_cases_use_only_earlier_source_events(toy) -> None:
    cat, silos = toy
    (c,) = cross_cases(cat, silos, "q", "p", "test")
    assert [e.item_id for e in c.history] == ["q1"] and c.target.item_id == "p2" and c.source == "q"
    (c,) = cross_cases(cat, silos, "p", "q", "test")
    assert [e.item_id for e in c.history] == ["p1", "p2"] and c.target.item_id == "q2"


def test_evaluate_reports_every_group_with_intervals(toy) -> None:
    cat, silos = toy
    stats = TrainStats(cat, silos)
    res = evaluate([MostPopular(stats), CategoryMarkov(stats), ItemCooccurrence(stats)], cat, silos, "test", reps=50)
    assert set(res["methods"]["most-popular"]) == {"p", "q", "overall", "p->q", "q->p"}
    e = res["methods"]["item-cooccurrence"]["p"]["mrr"]
    assert e["value"] == pytest.approx(0.5) and e["ci95"] == [0.5, 0.5] and e["n"] == 1
    assert "migration-auc" not in res["methods"]["most-popular"]["p->q"]
    assert res["users"] == {"p": 1, "q": 1, "p->q": 1, "q->p": 1, "overall": 2}


def test_paired_differences_to_reference(toy) -> None:
    cat, silos = toy
    stats = TrainStats(cat, silos)
    res = evaluate([MostPopular(stats), ItemCooccurrence(stats)], cat, silos, "test", reps=30)
    assert res["reference"] == "most-popular" and set(res["differences"]) == {"item-cooccurrence"}
    d = res["differences"]["item-cooccurrence"]["p"]["mrr"]
    assert d["value"] == pytest.approx(1 / 2 - 1 / 3, abs=1e-6)  # rank 1 vs rank 2 (JSON rounds to 6 digits)
    assert d["ci95"] == pytest.approx([1 / 6, 1 / 6], abs=1e-6)
