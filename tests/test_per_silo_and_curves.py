"""The experiment's per-silo comparison (federated vs local-only, paired per silo), the
learning-curve points, their tables/CSV rows and plot, and the plan's curve cost, on small
synthetic per-user arrays (no training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared_model.metrics import ndcgs
from simulations.experiment import per_silo as ps
from simulations.experiment.curves import common_rounds, curve_point, learning_curve, round_checkpoints
from simulations.experiment.report import curve_rows, curve_table, silo_table
from simulations.experiment.per_silo import silo_rows


def users(ranks: list[int]) -> dict[str, np.ndarray]:
    """Per-user results as :func:`simulations.evaluation.per_user` returns them."""
    n = len(ranks)
    return {"rank": np.asarray(ranks, dtype=np.int64), "tied": np.zeros(n, dtype=np.int64),
            "acc1": np.ones(n), "acc3": np.ones(n), "migrating": np.zeros(n, dtype=bool),
            "defined": np.zeros(n, dtype=bool), "js": np.full(n, np.nan), "mass": np.full(n, np.nan),
            "new1": np.full(n, np.nan)}


OWNERS = {"a": ["a-large", "a-small", "a-large", "a-small", "a-large", "a-small"], "b": ["b-large"] * 3}


def test_per_silo_difference_is_paired_per_silo() -> None:
    # a-small: federated ranks every target first, local-only at rank 50 → Δ NDCG@10 = +1 exactly;
    # a-large and b-large: the same ranks for both → Δ = 0 with a [0, 0] interval
    fed = {"a": users([3, 0, 3, 0, 20, 0]), "b": users([1, 2, 3])}
    loc = {"a": users([3, 50, 3, 50, 20, 50]), "b": users([1, 2, 3])}
    out = ps.per_silo_comparison(fed, loc, OWNERS, reps=200, seed=0, train_users={"a-small": 7})
    assert sorted(out) == ["a-large", "a-small", "b-large"]
    small = out["a-small"]
    assert small["platform"] == "a" and small["users"] == 3 and small["train-users"] == 7
    assert small["federated"]["ndcg10"]["value"] == 1.0 and small["local-only"]["ndcg10"]["value"] == 0.0
    assert small["delta"]["ndcg10"]["value"] == 1.0 and small["delta"]["ndcg10"]["ci95"] == [1.0, 1.0]
    large = out["a-large"]
    want = float(ndcgs(np.array([3, 3, 20]), 10, np.zeros(3, dtype=np.int64)).mean())
    assert large["federated"]["ndcg10"]["value"] == pytest.approx(want, abs=1e-6)
    assert large["delta"]["ndcg10"]["value"] == 0.0 and large["delta"]["ndcg10"]["ci95"] == [0.0, 0.0]
    # the same draws for both methods of a silo: identical per-user values give identical intervals
    assert large["federated"]["ndcg10"]["ci95"] == large["local-only"]["ndcg10"]["ci95"]
    rows = silo_rows({"per-silo": {"silos": out}})
    assert len(rows) == 3 * len(ps.SILO_METRICS) and len(rows[0]) == len(ps.SILO_CSV_HEADER)
    assert rows[[r[0] == "a-small" and r[4] == "ndcg10" for r in rows].index(True)][-3:] == [1.0, 1.0, 1.0]
    table = "\n".join(silo_table({"per-silo": {"federated": "federated-dp-eps8", "local-only": "local-only-eps8",
                                                "split": "test", "silos": out}, "regions": {"share": 0.1}}))
    assert "**Table 4.**" in table and "≈0.1 of them" in table
    assert "| `a-small` | a | 7 | 3 | 1.000 [1.000, 1.000] | 0.000 [0.000, 0.000] | +1.000 [+1.000, +1.000] |" in table


def test_small_silos_pooled_in_one_paired_row() -> None:
    # two platforms, each with a large and a small silo; the small ones pooled: federated ranks
    # a-small's 3 targets first (local-only: rank 50) and b-small's 1 target at rank 50 under both
    owners = {"a": OWNERS["a"], "b": ["b-large", "b-small", "b-large"]}
    fed = {"a": users([3, 0, 3, 0, 20, 0]), "b": users([1, 50, 3])}
    loc = {"a": users([3, 50, 3, 50, 20, 50]), "b": users([1, 50, 3])}
    train = {"a-large": 90, "a-small": 9, "b-large": 80, "b-small": 8}
    assert ps.small_silos(train) == ["a-small", "b-small"]
    assert ps.small_silos({"x": 5, "y": 5}) == []  # equal silos: nothing is small
    assert ps.small_silos({"r0": 3951, "r1": 4049}) == []  # about equal (the regions layout): nothing is small
    out = ps.pooled_comparison(fed, loc, owners, ps.small_silos(train), reps=200, seed=0, train_users=train)
    assert out is not None and out["silos"] == ["a-small", "b-small"] and out["platform"] == "a+b"
    assert out["users"] == 4 and out["train-users"] == 17
    assert out["federated"]["ndcg10"]["value"] == 0.75 and out["local-only"]["ndcg10"]["value"] == 0.0
    d = out["delta"]["ndcg10"]
    assert d["value"] == 0.75 and 0.0 <= d["ci95"][0] <= 0.75 <= d["ci95"][1] <= 1.0
    assert ps.pooled_comparison(fed, loc, owners, ["nobody"], reps=50, seed=0) is None
    doc = {"per-silo": {"federated": "federated-dp-eps8", "local-only": "local-only-eps8", "split": "test",
                        "silos": ps.per_silo_comparison(fed, loc, owners, reps=50, seed=0, train_users=train),
                        "pooled": {"small": out}}}
    rows = silo_rows(doc)
    assert [r[0] for r in rows[-len(ps.SILO_METRICS):]] == ["pooled:small"] * len(ps.SILO_METRICS)
    table = "\n".join(silo_table(doc))
    assert "The last row pools" in table
    assert table.splitlines()[-1].startswith("| small silos pooled (`a-small` + `b-small`) | a+b | 17 | 4 | 0.750")


def test_split_by_silo_refuses_misaligned_owners() -> None:
    with pytest.raises(ValueError, match="2 owners for 3 users"):
        ps.split_by_silo({"b": users([1, 2, 3])}, {"b": ["x", "y"]})


def test_curve_point_pools_platforms() -> None:
    pt = curve_point({"a": users([0, 50]), "b": users([1])}, reps=100, seed=0)
    want = float(ndcgs(np.array([0, 50, 1]), 10, np.zeros(3, dtype=np.int64)).mean())
    assert pt["users"] == 3 and pt["ndcg10"]["value"] == pytest.approx(want, abs=1e-6)
    lo, hi = pt["ndcg10"]["ci95"]
    assert lo <= want <= hi


def test_learning_curve_one_point_per_common_round(tmp_path: Path) -> None:
    for run, rounds in (("s1", (0, 1, 2)), ("s2", (0, 1))):  # s2 stopped after round 1
        for r in rounds:
            (tmp_path / run / "checkpoints" / f"round-{r:03d}").mkdir(parents=True)
    assert sorted(round_checkpoints(tmp_path / "s1")) == [0, 1, 2]
    assert common_rounds([tmp_path / "s1", tmp_path / "s2"]) == [0, 1]
    seen = []

    def score(cks: dict[str, Path]) -> int:  # the "predictor" is the round number
        seen.append({s: p.name for s, p in cks.items()})
        return int(next(iter(cks.values())).name.split("-")[1])

    def evaluate(pred: int, groups: object, platforms: object) -> dict:
        return {"a": users([0] * pred + [50] * (2 - pred))}  # round r: r of 2 users hit at rank 0

    pts = learning_curve({"x": tmp_path / "s1", "y": tmp_path / "s2"}, {}, ["a"], score, evaluate,
                         steps_per_round=16, reps=50, seed=0)
    assert [(p["round"], p["dp-steps"], p["ndcg10"]["value"]) for p in pts] == [(0, 0, 0.0), (1, 16, 0.5)]
    assert seen[1] == {"x": "round-001", "y": "round-001"}
    doc = {"learning-curves": {"users": {"a": 2}, "steps-per-round": 16, "methods": {"local-only-eps8": pts}}}
    table = "\n".join(curve_table(doc))
    assert "**Table 5.**" in table and "| 1 | 16 | 0.500 [" in table
    rows = curve_rows(doc)
    assert [r[:4] for r in rows] == [["local-only-eps8", 0, 0, 2], ["local-only-eps8", 1, 16, 2]]


def test_learning_curve_plot_is_drawn() -> None:
    from simulations.experiment.plots import PLOTS, plots

    pts = [{"round": r, "dp-steps": 16 * r, "users": 2, "ndcg10": {"value": v, "ci95": [v - 0.1, v + 0.1]}}
           for r, v in ((0, 0.2), (1, 0.3))]
    out = plots({"methods": {}, "curves": {}, "split": "test",
                 "learning-curves": {"methods": {"federated-dp-eps8": pts}}})
    assert "learning-curve.png" in PLOTS and out["learning-curve.png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_counts_the_curve_cost(base: Path) -> None:
    from simulations.experiment.plan import EXPERIMENT_PRESETS, make_plan, preset_with

    preset = preset_with(EXPERIMENT_PRESETS["smoke"], curve_users=3)
    plan = make_plan(preset, base, None)
    assert plan.curve_methods == ["federated-dp-eps8", "local-only-eps8"]
    assert plan.curve_users == 3 * 2  # ≤3 validation users on each of 2 platforms
    rounds = preset.config().num_server_rounds + 1
    local = next(m for m in plan.methods if m.name == "local-only-eps8")
    want = rounds * ((1 + len(local.runs)) * preset.checkpoint_load_s + 2 * plan.curve_users * preset.user_score_s)
    assert plan.curve_estimate_s() == pytest.approx(want)
    assert make_plan(preset_with(preset, curve_users=0), base, None).curve_estimate_s() == 0.0


def test_plan_evaluation_cost_scales_with_held_out_users(base: Path) -> None:
    from shared_model.dataset import list_silos, load_silo, read_catalogue
    from simulations.experiment.plan import EXPERIMENT_PRESETS, make_plan, preset_with

    cat = read_catalogue(base)
    silos = [load_silo(base / "silos" / s, cat) for s in list_silos(base)]
    test = {p: {u for s in silos if s.platform == p for u, v in s.splits.items() if v == "test"} for p in ("p0", "p1")}
    on = {p: {u for s in silos if s.platform == p for u in s.splits} for p in ("p0", "p1")}
    preset = EXPERIMENT_PRESETS["smoke"]
    plan = make_plan(preset, base, None)
    assert plan.held_out == {"p0": len(test["p0"]), "p1": len(test["p1"]), "p0->p1": len(test["p1"] & on["p0"]),
                             "p1->p0": len(test["p0"] & on["p1"])}
    by = {m.name: m for m in plan.methods}
    one = preset.user_score_s
    # one model of both platforms: every platform's users and the cross-platform groups
    assert plan.eval_estimate(by["federated-dp-eps8"]) == pytest.approx(
        preset.checkpoint_load_s + one * sum(plan.held_out.values()))
    # local-only: a model per silo, no cross-platform groups; LOPO: the platform it never saw
    local = by["local-only-eps8"]
    assert plan.eval_estimate(local) == pytest.approx(
        len(local.runs) * preset.checkpoint_load_s + one * (plan.held_out["p0"] + plan.held_out["p1"]))
    assert plan.eval_estimate(by["lopo-p0-to-p1-eps8"]) == pytest.approx(
        preset.checkpoint_load_s + one * plan.held_out["p1"])
    capped = make_plan(preset_with(preset, max_users=2), base, None)
    assert all(n == min(plan.held_out[g], 2) for g, n in capped.held_out.items())
