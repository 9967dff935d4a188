"""Baselines and the evaluation harness on a hand-built two-platform dataset."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.schema import Catalogue, Event, Item, Silo
from simulations.evaluation import (
    Case,
    CategoryMarkov,
    HistoryLogit,
    ItemCooccurrence,
    MostPopular,
    TrainStats,
    cross_cases,
    evaluate,
    new_interest_hit,
    per_user,
    platform_cases,
)


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
    # most popular: p3 (3), then p2 and p4 tie at 1 (a tie: ranks 1 and 2 equally likely), p1 excluded
    pop = per_user(MostPopular(stats), cases, "p", cat, cats)
    assert pop["rank"].tolist() == [1] and pop["tied"].tolist() == [1]
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
    # rank 1 vs ranks 1–2 tied (expected RR (1/2 + 1/3)/2; JSON rounds to 6 digits)
    assert d["value"] == pytest.approx(1 / 2 - 5 / 12, abs=1e-6)
    assert d["ci95"] == pytest.approx([1 / 12, 1 / 12], abs=1e-6)


def test_new_interest_hit_hand_computed() -> None:
    probs = np.array([0.5, 0.3, 0.2, 0.0])
    recent = np.array([1.0, 0.0, 0.0, 0.0])  # category 0 is recent: the best outside it is 1
    assert new_interest_hit(probs, recent, 1) == 1.0
    assert new_interest_hit(probs, recent, 2) == 0.0
    assert new_interest_hit(probs, np.array([1.0, 1.0, 0.0, 0.0]), 2) == 1.0
    assert np.isnan(new_interest_hit(probs, recent, -1))  # unlabelled target
    assert np.isnan(new_interest_hit(probs, np.array([1.0, 1.0, 1.0, 0.0]), 3))  # no mass outside: no pick


def test_new_interest_metric_on_a_migrating_user(toy) -> None:
    cat, silos = toy
    stats = TrainStats(cat, silos)
    # history x, x; next y: migrating. Markov from x puts y first (x→y twice), so both metrics hit;
    # most-popular's majority class is y as well, and outside the recent {x} its best is y too.
    ev = _ev("m", [("p1", 0), ("p2", 2), ("p3", 4)])
    case = Case("m", "p", "p", tuple(ev[:2]), ev[2], "y", True, True)
    for pred in (CategoryMarkov(stats), MostPopular(stats)):
        u = per_user(pred, [case], "p", cat, stats.categories)
        assert u["acc1"].tolist() == [1.0] and u["new1"].tolist() == [1.0], pred.name
    # a non-migrating user has a value too (the metric's summary keeps migrating users only)
    keep = Case("k", "p", "p", tuple(ev[:2]), ev[1], "x", False, True)
    u = per_user(CategoryMarkov(stats), [keep], "p", cat, stats.categories)
    assert u["new1"].tolist() == [0.0]  # best outside {x} is y, the target is x


def test_history_logit_learns_to_stay_in_the_last_category() -> None:
    """Planted behaviour: every train user stays in one category. The fitted head must put the
    user's own category first whatever the class frequencies (most-popular cannot)."""
    items = {f"{c}{i}": Item(f"{c}{i}", "p", f"{c} item {i}", ("top", c)) for c in "abc" for i in range(4)}
    cat = Catalogue(items)
    hist, split = {}, {}
    for u in range(30):
        c = "a" if u < 20 else "b" if u < 27 else "c"  # a is the majority class
        hist[f"u{u}"] = _ev(f"u{u}", [(f"{c}{(u + j) % 4}", j) for j in range(4)])
        split[f"u{u}"] = "train"
    silos = {"p-r0": Silo("p-r0", "p", split, hist)}
    stats = TrainStats(cat, silos)
    model = HistoryLogit(stats, silos, cuts=3)
    assert model.examples == 30 * 3
    assert float(model.shared.sum() + model.per_category.sum(0).mean()) > 1.0  # history features weigh
    cases = [Case(f"t{c}", "p", "p", (Event(f"t{c}", f"{c}0", 0),), Event(f"t{c}", f"{c}1", 1), c, False, True)
             for c in "abc"]
    probs = model.distributions(cases, "p")
    assert probs.sum(1) == pytest.approx([1.0, 1.0, 1.0])
    assert probs.argmax(1).tolist() == [stats.cat_index[c] for c in "abc"]
    assert MostPopular(stats).predict(cases, "p")[1].argmax(1).tolist() == [stats.cat_index["a"]] * 3
    scores, _ = model.predict(cases, "p")
    cols = stats.platform_cols["p"]
    top = [stats.item_cat[cols[int(np.argmax(row))]] for row in scores]
    assert top == [stats.cat_index[c] for c in "abc"]  # next item from the predicted category
