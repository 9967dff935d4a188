"""The scoring path's exclusion and ranking and the metric functions against hand-computed
values: history exclusion (never the target), ranks with ties, a seeded candidate sample
that holds the target, per-user HR, NDCG, MRR, accuracy@k and their means, ROC-AUC
(Mann–Whitney, with ties), Jensen–Shannon migration score, and the paired bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared_model.config import RunConfig
from shared_model.metrics import hits, mean, ndcgs, reciprocal_ranks, roc_auc, topk_correct
from shared_model.migration import js_divergence, migration_score, new_interest, recent_distribution
from shared_model.schema import Catalogue, Event, Item
from shared_model.scoring import (
    Candidates,
    ItemTower,
    candidates,
    exclude_history,
    rank_of_target,
    rank_targets,
    sample_rows,
    score_candidates,
    top_items,
)
from simulations.evaluation.bootstrap import bootstrap_indices, bootstrap_mean_ci, paired_bootstrap, paired_difference


def test_ranking_metrics_hand_computed() -> None:
    ranks = [0, 2, 9, 10, 49]
    # HR@10: ranks 0, 2, 9 hit → 3/5
    assert hits(ranks).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert mean(hits(ranks)) == pytest.approx(0.6)
    # NDCG@10: 1/log2(2) + 1/log2(4) + 1/log2(11) = 1 + 0.5 + 0.289064...
    assert ndcgs(ranks)[:2].tolist() == [1.0, 0.5] and ndcgs(ranks)[3:].tolist() == [0.0, 0.0]
    assert mean(ndcgs(ranks)) == pytest.approx((1.0 + 0.5 + 1 / math.log2(11)) / 5)
    # MRR: (1 + 1/3 + 1/10 + 1/11 + 1/50) / 5
    assert mean(reciprocal_ranks(ranks)) == pytest.approx((1 + 1 / 3 + 1 / 10 + 1 / 11 + 1 / 50) / 5)
    # NaN users are left out of a mean; no defined user → NaN
    assert mean([1.0, math.nan, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert math.isnan(mean([])) and math.isnan(mean([math.nan]))
    # a mean is summed in user order, as a plain sum would be
    v = [0.1, 0.2, 0.3, 1e16, -1e16]
    assert mean(v) == sum(v) / 5


def test_rank_of_target_ties_and_exclusion() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.2, 0.8, 0.3, 0.8]])
    scores[0, 0] = float("-inf")  # an excluded history item
    # (above, tied): row 0's target 0.5 ties with one other; row 1's 0.8 ties with one other
    assert rank_of_target(scores, torch.tensor([1, 3])).tolist() == [(0, 1), (0, 1)]
    ranked = rank_of_target(torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.3, 0.2], [0.0, 0.1, 0.2]]), torch.tensor([2, 1, 2]))
    assert ranked.tolist() == [(1, 0), (0, 1), (0, 0)]
    assert ranked.mid.tolist() == [1.0, 0.5, 0.0]  # the expected rank under a random order of the tie


def test_history_exclusion_never_drops_the_target() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5],
                           [0.1, 0.2, 0.3, 0.4, 0.5],
                           [0.5, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    targets = torch.tensor([3, 4, 2])
    # user 0 saw items 0 and 3 (3 is also its target: it stays); user 1 saw nothing;
    # user 2 saw 0, 1, 2 (2 is its target) — it remains tied with 3 and 4
    seen = [{0, 3}, set(), [1, 0, 2, 1]]
    ranks = rank_targets(scores.clone(), targets, seen)
    assert ranks.tolist() == [(2, 0), (0, 0), (0, 2)]  # [·, 0.8, 0.7, 0.6 ...] → 2; 0.5 is the best → 0; tie of 3
    out = exclude_history(scores.clone(), seen, targets)
    inf = float("-inf")
    assert out.tolist() == [[inf, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5], [inf, inf, 0.5, 0.5, 0.5]]
    # without a target (recommend): every seen item goes, and the top items skip them
    row = exclude_history(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), [[0]])[0]
    assert top_items(row, 2) == ([2.0, 1.0], [2, 1])
    assert top_items(row, 10)[1] == [2, 1, 3]  # never an excluded item, even when k is larger


def _tower() -> ItemTower:
    # unit item vectors in 2-d; with user (1, 0) an item's cosine is its first coordinate
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [1.0, 0.0], [-1.0, 0.0]])
    return ItemTower(torch.zeros(6, dtype=torch.long), embeddings=emb)


def test_sampled_candidates_hold_the_target_once() -> None:
    cfg = RunConfig(logit_scale=1.0, category_prior_weight=0.0)
    tower = _tower()
    cands = Candidates(torch.tensor([1, 3, 4]), tower.vectors(torch.tensor([1, 3, 4]), torch.device("cpu")),
                       torch.zeros(3, dtype=torch.long), own_target=tower)
    assert cands.size == 4 and cands.column == {1: 1, 3: 2, 4: 3}
    user = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    logits = torch.zeros(2, 2)
    target_rows = torch.tensor([3, 0])  # user 0's target was drawn into the sample, user 1's was not
    scores = score_candidates(user, logits, cands, cfg, target_rows)
    # column 0: each user's own target (0.8, then 1.0); columns 1..3: rows 1, 3, 4
    torch.testing.assert_close(scores, torch.tensor([[0.8, 0.6, 0.8, 1.0], [1.0, 0.6, 0.8, 1.0]]))
    targets = cands.target_columns(target_rows)
    assert targets.tolist() == [0, 0]
    # user 0 saw row 4; the target's second copy (column 2) is excluded too: ranked once
    seen = [cands.seen_columns({4, None}, 3), cands.seen_columns({1}, 0)]
    assert seen == [{2, 3}, {1}]
    # user 0: 0.8 vs [0.6] → 0; user 1: 1.0 vs [0.8, 1.0] → none above, tied with row 4
    assert rank_targets(scores, targets, seen).tolist() == [(0, 0), (0, 1)]


def test_full_candidates_rank_every_platform_item() -> None:
    cfg = RunConfig(logit_scale=2.0, category_prior_weight=0.0)
    cands = candidates(_tower(), torch.tensor([0, 2, 3, 5]), torch.device("cpu"))
    assert cands.own_target is None and cands.size == 4 and cands.column == {0: 0, 2: 1, 3: 2, 5: 3}
    scores = score_candidates(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), cands, cfg)
    torch.testing.assert_close(scores, torch.tensor([[2.0, 0.0, 1.6, -2.0]]))
    targets = cands.target_columns(torch.tensor([3]))
    # history rows 0 and 3 (3 is the target) and 1 (not a candidate): row 0 goes, the target stays
    assert rank_targets(scores, targets, [cands.seen_columns({0, 3, 1}, 3)]).above.tolist() == [0]


def test_seeded_sample_is_reproducible_sorted_and_only_when_smaller() -> None:
    rows = torch.arange(10, 30)
    a, b = sample_rows(rows, 5, seed=7), sample_rows(rows, 5, seed=7)
    assert torch.equal(a, b) and len(a) == 5 and a.tolist() == sorted(a.tolist())
    assert set(a.tolist()) <= set(rows.tolist())
    assert not torch.equal(a, sample_rows(rows, 5, seed=8))
    tower = ItemTower(torch.zeros(30, dtype=torch.long), embeddings=torch.eye(30))
    assert candidates(tower, rows, torch.device("cpu"), sample=5, seed=7).rows.tolist() == a.tolist()
    full = candidates(tower, rows, torch.device("cpu"), sample=20, seed=7)  # not smaller: every row, no own column
    assert full.own_target is None and torch.equal(full.rows, rows)


def test_topk_accuracy_hand_computed() -> None:
    probs = np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    truth = [1, 0, -1]
    assert np.array_equal(topk_correct(probs, truth, 1)[:2], [0.0, 0.0])
    assert np.array_equal(topk_correct(probs, truth, 2)[:2], [1.0, 0.0])
    assert np.array_equal(topk_correct(probs, truth, 4)[:2], [1.0, 1.0])
    assert math.isnan(topk_correct(probs, truth, 1)[2])  # unknown truth
    # logits work as well (masked classes are -inf); the mean leaves the unknown truth out
    logits = np.log(np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.6, 0.3, 0.0]]))
    assert mean(topk_correct(logits, [0, 3, -100], 1)) == 1.0
    assert mean(topk_correct(logits, [1, 3, 1], 1)) == pytest.approx(2 / 3)


def test_auc_mann_whitney_with_ties() -> None:
    # positives 0.8, 0.5; negatives 0.5, 0.2: pairs 1 + 1 + ½ (tie) + 1 = 3.5 of 4
    assert roc_auc([0.8, 0.5, 0.5, 0.2], [True, True, False, False]) == pytest.approx(0.875)
    assert roc_auc([3, 1, 2, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert roc_auc([0, 1], [1, 0]) == pytest.approx(0.0)
    assert roc_auc([0.4] * 6, [1, 0, 1, 0, 0, 1]) == pytest.approx(0.5)
    # positives {2, 2, 1}, negatives {2, 1, 0}: wins 1+1+1 (vs 0) + 1+1 (2 vs 1) + ½·2 (2 vs 2) + ½ (1 vs 1) = 6.5 of 9
    assert roc_auc([2, 2, 1, 2, 1, 0], [1, 1, 1, 0, 0, 0]) == pytest.approx(6.5 / 9)
    assert math.isnan(roc_auc([0.1, 0.2], [True, True]))


def test_auc_matches_pairwise_definition_on_random_data() -> None:
    rng = np.random.default_rng(3)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.random(60) < 0.4
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert roc_auc(s, y) == pytest.approx(pairwise)


def test_jensen_shannon_hand_computed() -> None:
    assert float(js_divergence(np.array([0.2, 0.8]), np.array([0.2, 0.8]))) == pytest.approx(0.0, abs=1e-12)
    assert float(js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0]))) == pytest.approx(1.0)
    # p = (1, 0), q = (½, ½): m = (¾, ¼); KL(p‖m) = log2(4/3); KL(q‖m) = ½ log2(⅔) + ½ log2(2)
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * 1.0)
    assert float(js_divergence(np.array([1.0, 0.0]), np.array([0.5, 0.5]))) == pytest.approx(expected)


def test_migration_score_uses_last_k_labelled_events() -> None:
    items = {"a": Item("a", "p", "A", ("top", "x")), "b": Item("b", "p", "B", ("top", "y")),
             "n": Item("n", "p", "N", ("top",))}
    cat = Catalogue(items)
    cats = ["x", "y", "z"]
    hist = [Event("u", i, n) for n, i in enumerate(["a", "a", "b", "n"])]
    assert recent_distribution(hist, cat, cats, k=2).tolist() == [0.0, 1.0, 0.0]  # last 2: b, n (unlabelled)
    assert recent_distribution(hist, cat, cats, k=3).tolist() == [0.5, 0.5, 0.0]
    assert recent_distribution(hist[3:], cat, cats, k=5) is None
    assert migration_score(np.array([0.0, 0.0, 1.0]), hist, cat, cats, k=2) == pytest.approx(1.0)
    assert migration_score(np.array([0.0, 1.0, 0.0]), hist, cat, cats, k=2) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(migration_score(np.array([0.0, 1.0, 0.0]), hist[3:], cat, cats))


def test_bootstrap_interval_hand_cases() -> None:
    # a constant per-user value: the interval collapses onto it
    e = bootstrap_mean_ci([0.25] * 40, reps=200, seed=1)
    assert (e.value, e.low, e.high, e.n) == (0.25, 0.25, 0.25, 40)
    # Bernoulli(½) over 400 users: value 0.5, half-width ≈ 1.96·√(¼/400) ≈ 0.049
    v = np.array([1.0, 0.0] * 200)
    e = bootstrap_mean_ci(v, reps=2000, seed=2)
    assert e.value == 0.5 and e.low < 0.5 < e.high
    assert (e.high - e.low) / 2 == pytest.approx(1.96 * math.sqrt(0.25 / 400), rel=0.15)
    # NaN users are left out of the mean and of n
    e = bootstrap_mean_ci([1.0, np.nan, 0.0, 1.0], reps=100, seed=0)
    assert e.value == pytest.approx(2 / 3) and e.n == 3


def test_bootstrap_is_paired_and_reproducible() -> None:
    assert np.array_equal(bootstrap_indices(30, 5, 7), bootstrap_indices(30, 5, 7))
    rng = np.random.default_rng(0)
    a = rng.random(300)
    b = a + 0.01  # b is better on every user by exactly 0.01
    d = paired_difference(b, a, reps=500, seed=4)
    assert d.value == pytest.approx(0.01) and d.low == pytest.approx(0.01) and d.high == pytest.approx(0.01)
    # AUC metrics resample users with the same draws as the means
    y = rng.random(300) < 0.3
    s = np.where(y, rng.random(300) + 0.3, rng.random(300))
    out = paired_bootstrap({"m": ("mean", a), "auc": ("auc", (s, y, np.ones(300, bool)))}, 300, reps=300, seed=5)
    assert out["auc"].low < out["auc"].value < out["auc"].high
    assert out["auc"].value == pytest.approx(roc_auc(s, y))
    assert out["m"].n == 300 and out["auc"].n == 300


def test_new_interest_is_the_best_category_outside_the_recent_ones() -> None:
    p = np.array([0.6, 0.1, 0.3, 0.0])
    assert new_interest(p, np.array([0.5, 0.5, 0.0, 0.0])) == 2
    assert new_interest(p, np.array([1.0, 0.0, 0.0, 0.0])) == 2
    assert new_interest(p, np.array([0.0, 0.0, 1.0, 0.0])) == 0
    assert new_interest(p, np.array([0.2, 0.4, 0.4, 0.0])) is None  # the only category left has no mass


def test_all_equal_scores_give_chance_level() -> None:
    """A model whose scores are all equal ranks each target at chance: HR@10 = 10/N, not 1."""
    n = 500
    scores = torch.zeros(4, n)
    ranked = rank_of_target(scores, torch.tensor([0, 7, 250, 499]))
    assert ranked.above.tolist() == [0] * 4 and ranked.tied.tolist() == [n - 1] * 4
    assert hits(ranked.above, 10, ranked.tied).tolist() == pytest.approx([10 / n] * 4)
    assert ndcgs(ranked.above, 10, ranked.tied)[0] == pytest.approx(sum(1 / math.log2(r + 2) for r in range(10)) / n)
    assert reciprocal_ranks(ranked.above, ranked.tied)[0] == pytest.approx(sum(1 / (r + 1) for r in range(n)) / n)
    # a tie of 3 at ranks 8, 9, 10: HR@10 counts two of the three orders
    assert hits([8], 10, [2]).tolist() == pytest.approx([2 / 3])
    assert hits([3, 12], 10).tolist() == [1.0, 0.0]  # no tie: the plain definition


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_an_error_naming_what_was_scored(bad: float) -> None:
    from shared_model.scoring import ScoringError
    scores = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    scores[1, 2] = bad
    with pytest.raises(ScoringError, match=r"silo office-1: model scores: 1 of 2 row\(s\).*first rows \[1\]"):
        rank_of_target(scores, torch.tensor([0, 0]), "silo office-1: model scores")


def test_a_target_scored_minus_inf_is_an_error() -> None:
    from shared_model.scoring import ScoringError
    scores = torch.tensor([[float("-inf"), 0.2, 0.3]])
    with pytest.raises(ScoringError):
        rank_of_target(scores, torch.tensor([0]))
    assert rank_of_target(scores, torch.tensor([1])).tolist() == [(1, 0)]  # −inf elsewhere: excluded
