"""The DP popularity prior (issue #14 item 1): the histogram, its Gaussian release and its
accounting, the prior the server builds, and the score term the model trains."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from shared_model.config import RunConfig
from shared_model.model import ScoreTerm, PopularityPrior, item_scores
from shared_model.popularity import item_counts, log_prior, noisy_counts, prior_vector, sensitivity, user_items
from shared_model.privacy.audit_report import by_kind
from shared_model.privacy.recompute import INTEGER_ORDERS, opacus_rdp, recompute
from shared_model.privacy.records import DpSgdRound, PopularityRelease, parse_record, spending
from shared_model.privacy.state import PrivacyState
from shared_model.schema import Catalogue, Event, Item, Silo


def _events(user: str, items: list[str]) -> list[Event]:
    return [Event(user, item, order) for order, item in enumerate(items)]


def test_each_user_counts_at_most_c_distinct_recent_items_once() -> None:
    history = _events("u", ["a", "b", "a", "c", "c", "d"])
    assert user_items(history, 2) == ["d", "c"]  # newest first, repeats once
    assert user_items(history, 10) == ["d", "c", "a", "b"]
    silo = Silo("s", "p", {"u": "train", "v": "train", "w": "test"},
                {"u": history, "v": _events("v", ["a", "x", "a"]), "w": _events("w", ["a", "b"])})
    # item "x" is another platform's (not in the platform's ids): never counted; w is not a training user
    counts = item_counts(silo, ["u", "v"], ["a", "b", "c", "d"], max_items=3)
    assert counts.tolist() == [2.0, 0.0, 1.0, 1.0]  # u: d, c, a; v: a, x
    assert sensitivity(4) == 2.0  # one user changes ≤ c coordinates by ≤ 1: L2 √c


def test_noise_has_the_stated_standard_deviation_and_comes_from_the_seed() -> None:
    zeros = np.zeros(40_000)
    noisy = noisy_counts(zeros, noise_multiplier=2.0, max_items=4, seed=7)
    assert abs(noisy.std() - 2.0 * 2.0) < 0.05 and abs(noisy.mean()) < 0.05  # z·√c = 4
    assert np.array_equal(noisy, noisy_counts(zeros, 2.0, 4, seed=7))
    assert not np.array_equal(noisy, noisy_counts(zeros, 2.0, 4, seed=8))


def test_log_prior_drops_counts_within_the_noise_and_normalises() -> None:
    prior = log_prior(np.array([10.0, 2.0, -3.0, 0.0]), noise_std=1.0, threshold=3.0)
    expected = np.log(np.array([11.0, 1.0, 1.0, 1.0]) / 14.0)  # 2 ≤ 3·1 → 0; negatives → 0; +1 each
    assert np.allclose(prior, expected)
    exact = log_prior(np.array([3.0, 1.0]), noise_std=0.0, threshold=3.0)  # exact counts: nothing dropped
    assert np.allclose(exact, np.log([4 / 6, 2 / 6]))


def test_prior_vector_puts_each_platform_s_prior_on_its_own_items() -> None:
    items = {i: Item(i, "A" if i.startswith("a") else "B", "") for i in ["a1", "b1", "a2", "b2", "b3"]}
    catalogue = Catalogue(items)
    vec = prior_vector(catalogue, {"B": np.array([-1.0, -2.0, -3.0])})
    assert vec.tolist() == [0.0, -1.0, 0.0, -2.0, -3.0]  # catalogue (item-index row) order; A has no prior
    with pytest.raises(ValueError, match="platform A: 1 prior values for 2 catalogue items"):
        prior_vector(catalogue, {"A": np.array([0.0])})


def test_calibration_gives_the_release_its_marginal_share_and_the_whole_plan_fits_the_budget() -> None:
    cfg = RunConfig(num_server_rounds=3, local_steps=8, batch_size=32, epsilon=8.0, delta=1e-5,
                    popularity_epsilon_share=0.1, transitions=False)  # with transitions: tests/test_transitions.py
    with_prior = PrivacyState.calibrate("s", cfg, num_users=400)
    without = PrivacyState.calibrate("s", cfg.replace(**{"popularity-prior": False}), num_users=400)
    z, sgd = with_prior.popularity_noise_multiplier, [(with_prior.noise_multiplier, with_prior.sample_rate, 24)]
    assert without.popularity_noise_multiplier == 0.0 and z > 0
    assert 7.2 - 0.02 <= with_prior.epsilon_of(sgd) <= 7.2  # DP-SGD alone: (1 − share)·ε
    total = with_prior.epsilon_of(sgd + [(z, 1.0, 1)])
    assert 8.0 - 0.011 <= total <= 8.0  # the release takes the rest, never more
    assert with_prior.epsilon_of(sgd + [(z * 0.98, 1.0, 1)]) > 8.0  # and no less noise would fit
    assert with_prior.epsilon_of([(z, 1.0, 1)]) > 0.8  # alone it would spend more than its marginal share
    assert with_prior.noise_multiplier > without.noise_multiplier  # DP-SGD pays for the release
    # with dp metric releases too: all three compose within ε
    both = PrivacyState.calibrate("s", cfg, num_users=400, release_metrics="dp", metric_share=0.1)
    plan = [(both.noise_multiplier, both.sample_rate, 24), (both.metric_noise_multiplier, 1.0, both.planned_releases),
            (both.popularity_noise_multiplier, 1.0, 1)]
    assert 8.0 - 0.011 <= both.epsilon_of(plan) <= 8.0


def _release(**kw: object) -> PopularityRelease:
    fields = dict(run_id="1", silo="s", round=0, platform="p", items=100, max_items=8, noise_multiplier=5.0,
                  sensitivity=math.sqrt(8), delta=1e-5, accountant="rdp", epsilon_release=0.79,
                  epsilon_cumulative=0.79, epsilon_budget=8.0, users=400)
    fields.update(kw)
    return PopularityRelease(**fields)  # type: ignore[arg-type]


def test_a_single_gaussian_release_recomputes_to_the_closed_form() -> None:
    # RDP of the Gaussian mechanism α/(2z²) (Mironov 2017, Prop. 7), converted with Opacus's
    # rule ε = rdp + log((α−1)/α) − (log δ + log α)/(α − 1) (Balle et al. 2020), minimised over α.
    z, delta = 5.0, 1e-5
    closed = min(a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
                 for a in INTEGER_ORDERS)
    rec = parse_record(_release().to_dict())
    assert isinstance(rec, PopularityRelease) and spending([rec]) == [rec] and rec.mechanism == (5.0, 1.0, 1)
    assert math.isclose(opacus_rdp([rec.mechanism], delta, alphas=INTEGER_ORDERS), closed, rel_tol=1e-9)


def test_heterogeneous_composition_agrees_across_libraries_and_shows_the_share() -> None:
    sgd = DpSgdRound(run_id="1", silo="s", round=1, steps=48, sample_rate=0.01, noise_multiplier=1.1,
                     max_grad_norm=1.0, delta=1e-5, accountant="rdp", epsilon_round=1.0, epsilon_cumulative=1.0,
                     epsilon_budget=8.0)
    history = [_release().mechanism, sgd.mechanism]
    again = recompute(history, 1e-5, "rdp")
    assert again.same_accountant_diff < 1e-6  # Opacus RDP vs dp-accounting RDP, same integer orders
    kinds = by_kind([_release(), sgd], 1e-5, "rdp")
    assert kinds["popularity-releases"] == 1 and kinds["metric-releases"] == 0
    joint = opacus_rdp(history, 1e-5)
    sgd_alone = opacus_rdp([sgd.mechanism], 1e-5)
    assert math.isclose(kinds["popularity-share-of-epsilon"], (joint - sgd_alone) / joint, rel_tol=1e-9)
    assert 0 < kinds["popularity-share-of-epsilon"] < kinds["epsilon-popularity-release-alone"] / joint


def test_item_scores_gain_the_weighted_log_prior_of_each_candidate() -> None:
    prior, head = PopularityPrior(), ScoreTerm(0.5)
    rows = torch.tensor([[2, 0, 1]])
    assert torch.equal(head(prior.lookup(rows)), torch.zeros(1, 3))  # no prior yet: no term
    prior.set_prior([-1.0, -2.0, -4.0])
    term = head(prior.lookup(rows))
    assert torch.allclose(term, torch.tensor([[-2.0, -0.5, -1.0]]))
    user = torch.nn.functional.normalize(torch.ones(1, 4), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    index = torch.zeros(3, dtype=torch.long)
    plain = item_scores(user, torch.zeros(1, 1), items, index, 20.0, 1.0)
    assert torch.allclose(item_scores(user, torch.zeros(1, 1), items, index, 20.0, 1.0, term), plain + term)


class _Scorer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = ScoreTerm(1.0)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.head(values)


def test_opacus_per_example_gradient_of_the_weight_is_each_example_s_own() -> None:
    """DP-SGD clips what Opacus computes per example; for w it must be ∂loss_b/∂w of example b alone."""
    values = torch.tensor([[-1.0, -3.0, -2.0], [-5.0, -1.0, -1.5]])  # [B, 1 + K]: target column 0
    model = GradSampleModule(_Scorer(), loss_reduction="sum")
    loss = nn.functional.cross_entropy(model(values), torch.zeros(2, dtype=torch.long), reduction="sum")
    loss.backward()
    got = model._module.head.weight.grad_sample.flatten()
    for b in range(2):  # softmax CE: ∂/∂w = Σ_k p_k v_k − v_0
        p = torch.softmax(values[b], 0)
        assert math.isclose(float(got[b]), float((p * values[b]).sum() - values[b, 0]), rel_tol=1e-5)


def test_checkpoint_keeps_the_prior_and_the_trained_weight(small_dataset: Path, tiny_bert: Path, tmp_path: Path) -> None:
    from shared_model.adapters import load_checkpoint, save_checkpoint
    from shared_model.model import build_model

    cfg = RunConfig(dataset=str(small_dataset), base_model=str(tiny_bert), user_tower="text")
    model = build_model(cfg, num_categories=3)
    assert model.popularity_prior is not None and model.popularity_head is not None
    model.popularity_prior.set_prior(np.linspace(-9, -1, 480))
    with torch.no_grad():
        model.popularity_head.weight.fill_(0.37)
    save_checkpoint(model, tmp_path / "ck", {"categories": ["a", "b", "c"], "config": cfg.to_run_config()})
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.popularity_prior.log_prior, model.popularity_prior.log_prior)
    assert float(loaded.popularity_head.weight.detach()) == pytest.approx(0.37)
    off = cfg.replace(**{"popularity-prior": False})
    assert build_model(off, num_categories=3).popularity_head is None


# ------------------------------------------------------------ the newest history item's term
def test_last_item_similarity_is_scaled_cosine_and_zero_without_a_newest_item() -> None:
    from shared_model.model import last_item_similarity

    last = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    shared = last_item_similarity(last, torch.tensor([True, False]), items, 20.0)
    assert torch.allclose(shared, torch.tensor([[20.0, 12.0], [0.0, 0.0]]))  # user 2 has no newest item
    per_user = last_item_similarity(last, torch.tensor([True, True]), items.unsqueeze(0).expand(2, -1, -1), 20.0)
    assert torch.allclose(per_user, torch.tensor([[20.0, 12.0], [0.0, 16.0]]))


def test_batches_carry_each_example_s_newest_item_row() -> None:
    from shared_model.batches import NO_ITEM, collate

    a = (torch.tensor([1, 2, 3]), 4, 0, torch.zeros(2, 4), 9)
    b = (torch.tensor([5]), 6, 1, torch.zeros(2, 4))  # an entry without a newest item row
    *_, last = collate([a, b])
    assert last.tolist() == [9, NO_ITEM]


def test_the_newest_item_is_the_newest_on_the_scored_platform() -> None:
    from shared_model.batches import NO_ITEM, ExampleBatcher
    from shared_model.schema import Catalogue, Event, Example, Item

    cat = Catalogue({"a1": Item("a1", "A", "brush"), "a2": Item("a2", "A", "easel"), "b1": Item("b1", "B", "stapler")})
    batcher = ExampleBatcher(cat, [], RunConfig(), item_row={"a1": 0, "a2": 1, "b1": 2})
    history = (Event("u", "b1", 0), Event("u", "a1", 1), Event("u", "a2", 2))
    assert batcher.last_row(history) == 1  # no platform: the newest event
    assert batcher.last_row(history, "A") == 1 and batcher.last_row(history, "B") == 2
    assert batcher.last_row(history[1:], "B") == NO_ITEM  # only A events: no newest item on B
    # an example takes its target's platform: a cross-platform case gets no newest-item term
    cross = Example("u", history[1:], Event("u", "b1", 3), None, False)
    assert batcher(cross)[4] == NO_ITEM
    assert batcher(Example("u", history[:2], Event("u", "a2", 3), None, False))[4] == 0


def test_a_prior_that_is_not_finite_or_not_this_catalogue_s_is_refused() -> None:
    prior = PopularityPrior()
    with pytest.raises(ValueError, match="1 of 3 values are not finite"):
        prior.set_prior([0.0, float("nan"), -1.0])
    prior.set_prior([-1.0, -2.0])
    with pytest.raises(ValueError, match="2 values, but item row 5 was asked"):
        prior.lookup(torch.tensor([[0, 5]]))


def test_restore_refuses_a_popularity_release_made_with_other_noise() -> None:
    from shared_model.privacy.state import RestoreMismatch

    cfg = RunConfig(num_server_rounds=3, local_steps=8, batch_size=32, epsilon=8.0, delta=1e-5)
    state = PrivacyState.calibrate("s", cfg, num_users=400)
    same = _release(noise_multiplier=state.popularity_noise_multiplier)
    assert state.restore([same]).history == [(state.popularity_noise_multiplier, 1.0, 1)]
    with pytest.raises(RestoreMismatch, match="popularity release of round 0 used σ=2.5"):
        PrivacyState.calibrate("s", cfg, num_users=400).restore([_release(noise_multiplier=2.5)])
