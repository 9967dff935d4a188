"""The evaluation harness and the baselines on region silos (one region's users on every
platform, histories mixed), against the same users split into platform silos.

The hand-made dataset: platforms ``a`` (items a1, a2: category x; a3: y) and ``b`` (b1, b3: z;
b2: w); categories in vocabulary order w, x, y, z. Orders are positions in each user's merged
timeline, the events at a user's highest order are held out (one per platform):

====  ===========================  ==========================================
user  events (item@order)          held out (history before it)
====  ===========================  ==========================================
u1    a1@0 b1@1 a3@2               train
u2    a2@0 b2@1                    train
u3    b1@0 a3@1 b3@2               train
t1    a1@0 b1@1 a3@3 b2@3          a3 and b2, history a1 b1 (last on b)
t2    b1@0 a1@1 a2@2 b3@2          a2 and b3, history b1 a1 (last on a)
t3    a2@0 a1@1                    a1, history a2
t4    b2@0                         b2, empty history
====  ===========================  ==========================================
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared_model.dataset import load_dataset
from shared_model.layouts import layout_dir
from shared_model.metrics import hits
from shared_model.migration import js_divergence, recent_distribution
from shared_model.schema import Catalogue, Event, Item, Silo
from simulations.evaluation import (
    CategoryMarkov,
    ItemCooccurrence,
    MostPopular,
    TrainStats,
    cross_cases,
    evaluate,
    format_table,
    is_switch,
    per_user,
    platform_cases,
    switch_cases,
)
from simulations.evaluation.harness import _cap

EVENTS = {
    "u1": [("a1", 0), ("b1", 1), ("a3", 2)],
    "u2": [("a2", 0), ("b2", 1)],
    "u3": [("b1", 0), ("a3", 1), ("b3", 2)],
    "t1": [("a1", 0), ("b1", 1), ("a3", 3), ("b2", 3)],
    "t2": [("b1", 0), ("a1", 1), ("a2", 2), ("b3", 2)],
    "t3": [("a2", 0), ("a1", 1)],
    "t4": [("b2", 0)],
}
SPLIT = {"u1": "train", "u2": "train", "u3": "train", "t1": "test", "t2": "test", "t3": "test", "t4": "test"}
W, X, Y, Z = range(4)  # category indices (vocabulary order)


def _catalogue() -> Catalogue:
    cats = {"a1": "x", "a2": "x", "a3": "y", "b1": "z", "b2": "w", "b3": "z"}
    return Catalogue({i: Item(i, i[0], f"item {i}", ("top", c)) for i, c in cats.items()})


def _silo(name: str, platforms: tuple[str, ...]) -> Silo:
    hist = {u: [Event(u, i, o) for i, o in ev if i[0] in platforms] for u, ev in EVENTS.items()}
    hist = {u: h for u, h in hist.items() if h}
    for h in hist.values():  # by order, then platform (catalogue order), as load_silo sorts
        h.sort(key=lambda e: (e.order, e.item_id[0]))
    return Silo(name, platforms, {u: SPLIT[u] for u in hist}, hist)


@pytest.fixture()
def layouts() -> dict[str, tuple[Catalogue, dict[str, Silo]]]:
    cat = _catalogue()
    return {"regions": (cat, {"r0": _silo("r0", ("a", "b"))}),
            "platforms": (cat, {"a-r0": _silo("a-r0", ("a",)), "b-r0": _silo("b-r0", ("b",))})}


def _ids(events) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.item_id for e in events]


def test_platform_groups_same_users_and_targets_on_both_layouts(layouts) -> None:
    (cat, regions), (_, platforms) = layouts["regions"], layouts["platforms"]
    got = {}
    for name, silos in (("regions", regions), ("platforms", platforms)):
        got[name] = {p: [(c.user_id, c.target.item_id, _ids(c.history), c.migrating, c.migration_defined)
                         for c in platform_cases(cat, silos, p, "test")] for p in ("a", "b")}
    strip = {name: {p: [(u, t) for u, t, *_ in v] for p, v in g.items()} for name, g in got.items()}
    assert strip["regions"] == strip["platforms"] == {"a": [("t1", "a3"), ("t2", "a2"), ("t3", "a1")],
                                                      "b": [("t1", "b2"), ("t2", "b3"), ("t4", "b2")]}
    # the region silo's input is the whole mixed history; the platform silo's, its own platform's events
    assert [h for _, _, h, *_ in got["regions"]["a"]] == [["a1", "b1"], ["b1", "a1"], ["a2"]]
    assert [h for _, _, h, *_ in got["platforms"]["a"]] == [["a1"], ["a1"], ["a2"]]
    assert [h for _, _, h, *_ in got["regions"]["b"]] == [["a1", "b1"], ["b1", "a1"], []]
    # migration is read on the target's platform: the same flags on both layouts
    # (t1 a: {x} -> y moves; t2 a: {x} -> x stays; t3: {x} -> x; t1 b: {z} -> w moves; t2 b: {z} -> z; t4: undefined)
    for p in ("a", "b"):
        assert [m for *_, m, d in got["regions"][p]] == [m for *_, m, d in got["platforms"][p]]
        assert [d for *_, d in got["regions"][p]] == [d for *_, d in got["platforms"][p]]
    assert [m for *_, m, _ in got["regions"]["a"]] == [True, False, False]
    assert [(m, d) for *_, m, d in got["regions"]["b"]] == [(True, True), (False, True), (False, False)]
    assert all(c.source == "a+b" for c in platform_cases(cat, regions, "a", "test"))
    assert all(c.source == "a" for c in platform_cases(cat, platforms, "a", "test"))


def test_switch_cases_hand_counted(layouts) -> None:
    (cat, regions), (_, platforms) = layouts["regions"], layouts["platforms"]
    cases = platform_cases(cat, regions, "a", "test") + platform_cases(cat, regions, "b", "test")
    # t1 -> a3 after b1; t2 -> b3 after a1. Not: t1 -> b2 (after b1), t2 -> a2 (after a1), t3 -> a1
    # (after a2), t4 -> b2 (empty history)
    assert [(c.user_id, c.target.item_id) for c in switch_cases(cat, cases)] == [("t1", "a3"), ("t2", "b3")]
    flat = platform_cases(cat, platforms, "a", "test") + platform_cases(cat, platforms, "b", "test")
    assert not any(is_switch(c, cat) for c in flat)


def test_cold_start_same_on_both_layouts(layouts) -> None:
    (cat, regions), (_, platforms) = layouts["regions"], layouts["platforms"]
    for a, b, want in (("a", "b", [("t1", ["a1"], "b2"), ("t2", ["a1"], "b3")]),  # t4: no a event
                       ("b", "a", [("t1", ["b1"], "a3"), ("t2", ["b1"], "a2")])):  # t3: no b event
        for silos in (regions, platforms):
            got = cross_cases(cat, silos, a, b, "test")
            assert [(c.user_id, _ids(c.history), c.target.item_id) for c in got] == want
            assert all(c.source == a and c.platform == b and not c.migration_defined for c in got)
    # the held-out a event of t1 (order 3) is not below its b target's order: not input
    assert cross_cases(cat, regions, "a", "b", "test") == cross_cases(cat, platforms, "a", "b", "test")


def test_train_counts_are_the_same_on_both_layouts(layouts) -> None:
    (cat, regions), (_, platforms) = layouts["regions"], layouts["platforms"]
    r, p = TrainStats(cat, regions), TrainStats(cat, platforms)
    assert r.item_counts.tolist() == p.item_counts.tolist() == [1, 1, 2, 2, 1, 1]  # a1 a2 a3 b1 b2 b3
    for key in r.transitions:
        assert np.array_equal(r.transitions[key], p.transitions[key]), key
    for b in ("a", "b"):
        assert np.array_equal(r.mixed_transitions[b], p.mixed_transitions[b])
    assert (r.cooc != p.cooc).nnz == 0


def test_category_markov_across_platforms_hand_computed(layouts) -> None:
    cat, regions = layouts["regions"]
    s = TrainStats(cat, regions)
    # mixed counts, the last labelled event of any platform before each event:
    # u1 x -> z (b1), z -> y (a3); u2 x -> w (b2); u3 z -> y (a3), y -> z (b3)
    assert s.mixed_transitions["b"][X].tolist() == [1, 0, 0, 1]  # an a category predicting b ones
    assert s.mixed_transitions["a"][Z].tolist() == [0, 0, 2, 0]
    assert s.mixed_transitions["b"][Y].tolist() == [0, 0, 0, 1]
    assert s.mixed_transitions["a"][4].tolist() == [0, 2, 0, 0]  # first events: no category before
    mk = CategoryMarkov(s)
    cases = {(c.user_id, c.platform): c for p in ("a", "b") for c in platform_cases(cat, regions, p, "test")}
    # t2 -> b3: last category x (a1, on a). Row x of the b counts (w 1, z 1) + b's train frequency
    # (b2 w: 1; b1, b3 z: 2 + 1) = (1 + 1/4, 1 + 3/4), over 3; masked to b's classes w, z
    probs = mk.distributions([cases[("t2", "b")]], "b")[0]
    assert probs == pytest.approx([1.25 / 3, 0, 0, 1.75 / 3], abs=1e-5)
    # t1 -> a3: last category z (b1, on b). Row z of the a counts (y 2) + a's frequency (x 1/2, y 1/2)
    probs = mk.distributions([cases[("t1", "a")]], "a")[0]
    assert probs == pytest.approx([0, 0.5 / 3, 2.5 / 3, 0], abs=1e-5)
    # the same user on the platforms layout: only a1 (x), within-a counts x -> y once (u1)
    cat, platforms = layouts["platforms"]
    (c,) = [c for c in platform_cases(cat, platforms, "a", "test") if c.user_id == "t1"]
    assert CategoryMarkov(TrainStats(cat, platforms)).distributions([c], "a")[0] == pytest.approx(
        [0, 0.5 / 2, 1.5 / 2, 0], abs=1e-5)


def test_migration_read_on_the_target_platform(layouts) -> None:
    cat, regions = layouts["regions"]
    s = TrainStats(cat, regions)
    cats = s.categories
    (case,) = [c for c in platform_cases(cat, regions, "a", "test") if c.user_id == "t1"]  # a1 b1 -> a3
    assert recent_distribution(case.history, cat, cats, k=1).tolist() == [0, 0, 0, 1]  # b1 (z), no target
    assert recent_distribution(case.history, cat, cats, k=1, target=case.target).tolist() == [0, 1, 0, 0]  # a1 (x)
    assert recent_distribution(case.history, cat, cats, k=5, target=case.target).tolist() == [0, 1, 0, 0]
    u = per_user(CategoryMarkov(s), [case], "a", cat, cats)
    p = np.array([0, 0.5 / 3, 2.5 / 3, 0])
    assert u["js"][0] == pytest.approx(float(js_divergence(p, np.array([0.0, 1, 0, 0]))), abs=1e-5)
    assert u["mass"][0] == pytest.approx(2.5 / 3, abs=1e-5)  # outside the recent {x}
    assert u["new1"].tolist() == [1.0] and u["acc1"].tolist() == [1.0]  # y: both the arg-max and the new interest


def test_cooccurrence_counts_a_cross_platform_pair(layouts) -> None:
    cat, regions = layouts["regions"]
    s = TrainStats(cat, regions)
    col = s.item_col
    assert s.cooc[col["a3"], col["b1"]] == 2  # u1 and u3 bought both
    assert s.cooc[col["a1"], col["b1"]] == 1 and s.cooc[col["a2"], col["b2"]] == 1
    co = ItemCooccurrence(s)
    (mixed,) = [c for c in platform_cases(cat, regions, "b", "test") if c.user_id == "t2"]  # b1 a1 -> b3
    # over b1, b2, b3: a1 adds b1 (u1); b1 adds b3 (u3)
    assert np.floor(co.predict([mixed], "b")[0][0]).tolist() == [1, 0, 1]
    cat, platforms = layouts["platforms"]
    (alone,) = [c for c in platform_cases(cat, platforms, "b", "test") if c.user_id == "t2"]  # b1 -> b3
    assert np.floor(ItemCooccurrence(TrainStats(cat, platforms)).predict([alone], "b")[0][0]).tolist() == [0, 0, 1]


def test_evaluate_groups_on_both_layouts(layouts) -> None:
    out = {}
    for name, (cat, silos) in layouts.items():
        s = TrainStats(cat, silos)
        out[name] = evaluate([MostPopular(s), CategoryMarkov(s)], cat, silos, "test", reps=20)
    reg, flat = out["regions"], out["platforms"]
    assert reg["users"] == {"a": 3, "b": 3, "a->b": 2, "b->a": 2, "overall": 6, "switch": 2}
    assert flat["users"] == {"a": 3, "b": 3, "a->b": 2, "b->a": 2, "overall": 6}
    assert set(reg["methods"]["category-markov"]) == {"a", "b", "overall", "switch", "a->b", "b->a"}
    assert "switch" in reg["differences"]["category-markov"]
    # most-popular ignores the history but for the excluded items of the target platform: the same
    for g in ("a", "b", "overall", "a->b", "b->a"):
        assert reg["methods"]["most-popular"][g] == flat["methods"]["most-popular"][g], g
    # category-markov on switch: t1 -> a3 (y first, 5/6) and t2 -> b3 (z first, 1.75/3): both hit
    e = reg["methods"]["category-markov"]["switch"]["category-acc1"]
    assert e["value"] == 1.0 and e["n"] == 2
    table = format_table(reg)
    assert table.index("\noverall  (6 users)") < table.index("\nswitch  (2 users)") < table.index("\na->b  (2 users)")
    assert "\nswitch" not in format_table(flat)


BUNDLED = Path(__file__).resolve().parents[1] / "data" / "amazon-art-office"


@pytest.fixture(scope="module")
def bundled_regions() -> tuple[Catalogue, dict[str, Silo]]:
    return load_dataset(layout_dir(BUNDLED, "regions"))


def test_bundled_regions_layout_through_the_harness(bundled_regions) -> None:
    cat, silos = bundled_regions
    assert sorted(silos) == ["r0", "r1"] and silos["r0"].platforms == ("arts", "office")
    r0 = {"r0": silos["r0"]}
    arts, office = platform_cases(cat, r0, "arts", "test"), platform_cases(cat, r0, "office", "test")
    assert (len(arts), len(office), len(switch_cases(cat, arts + office))) == (497, 475, 475)
    s = TrainStats(cat, silos)
    preds = [MostPopular(s), CategoryMarkov(s), ItemCooccurrence(s)]
    res = evaluate(preds, cat, silos, "valid", reps=20, max_users=40)
    groups = {"arts", "office", "overall", "switch", "arts->office", "office->arts"}
    assert set(res["users"]) == groups
    for m in res["methods"].values():
        assert set(m) == groups
    assert {g: n for g, n in res["users"].items() if g != "switch"} == {
        "arts": 40, "office": 40, "overall": 80, "arts->office": 40, "office->arts": 40}
    # switch: the switching cases of the two 40-user subsets (drawn arts first, then office), scored once
    rng = np.random.default_rng(0)
    sub = {p: _cap(platform_cases(cat, silos, p, "valid"), 40, rng) for p in ("arts", "office")}
    switch = {p: switch_cases(cat, cs) for p, cs in sub.items()}
    assert res["users"]["switch"] == sum(len(v) for v in switch.values()) > 0
    parts = [per_user(MostPopular(s), cs, p, cat, s.categories) for p, cs in switch.items() if cs]
    hr10 = np.concatenate([hits(u["rank"], 10, u["tied"]) for u in parts])
    e = res["methods"]["most-popular"]["switch"]["hr10"]
    assert e["n"] == len(hr10) and e["value"] == pytest.approx(float(hr10.mean()), abs=1e-6)


def test_own_platform_history_is_the_platforms_layout_s_case(bundled_regions) -> None:
    """`evaluate --against-own-platform`: a region case's history cut to the target's platform is
    exactly the platforms layout's case for that user and target, so the two federations are
    compared on the same inputs, paired; cold start on B keeps no history."""
    from simulations.evaluation import OwnPlatformHistory

    cat, regions = bundled_regions
    _, flat = load_dataset(BUNDLED)
    seen: list = []

    class Recorder:
        name = "against"

        def predict(self, cases, platform):  # type: ignore[no-untyped-def]
            seen.extend(cases)
            return np.zeros((len(cases), 1)), np.zeros((len(cases), 1))

    own = OwnPlatformHistory(Recorder(), cat)
    assert own.name == "against"
    for platform in ("arts", "office"):
        seen.clear()
        mixed = platform_cases(cat, regions, platform, "test")
        own.predict(mixed, platform)
        want = {(c.user_id, c.target.item_id): c.history for c in platform_cases(cat, flat, platform, "test")}
        got = {(c.user_id, c.target.item_id): c.history for c in seen}
        assert got == want and len(got) == len(mixed) > 400
        assert any(len(c.history) < len(m.history) for c, m in zip(seen, mixed))  # the other platform was cut
    seen.clear()
    cold = cross_cases(cat, regions, "arts", "office", "test")
    own.predict(cold, "office")
    assert cold and all(c.history == () for c in seen)


def test_against_own_platform_without_against_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from fedshift.cli import main

    assert main(["evaluate", "--against-own-platform"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--against-own-platform" in err[0] and "give --against" in err[0]
