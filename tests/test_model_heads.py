"""The next-item and next-interest heads: scoring identities and the platform mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shared_model.model import category_prior, item_scores, mask_to_platform, own_item_scores


def test_paired_scores_equal_the_diagonal_of_full_scores() -> None:
    g = torch.Generator().manual_seed(0)
    user = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    logits = torch.randn(4, 5, generator=g)
    items = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    prior_index = torch.tensor([0, 3, 5, 1])  # 5 = unlabelled
    full = item_scores(user, logits, items, prior_index, 20.0, 1.0)
    paired = own_item_scores(user, logits, items, prior_index, 20.0, 1.0)
    assert torch.allclose(full.diagonal(), paired, atol=1e-5)
    # score = 20·cos + log p(category); unlabelled items get the mean log-probability
    logp = F.log_softmax(logits, dim=-1)
    assert math.isclose(float(paired[2]), float(20 * (user[2] @ items[2]) + logp[2].mean()), rel_tol=1e-5)


def test_platform_mask_restricts_predictions_and_keeps_the_prior_finite() -> None:
    logits = torch.tensor([[5.0, 0.0, 1.0, 2.0]])
    mask = torch.tensor([False, True, True, True])  # class 0 belongs to another platform
    masked = mask_to_platform(logits, mask)
    assert int(masked.argmax(-1)) == 3
    prior = category_prior(masked)
    probs = prior[0, :4].exp()
    assert float(probs[0]) == 0.0 and math.isclose(float(probs[1:].sum()), 1.0, rel_tol=1e-6)
    assert math.isclose(float(prior[0, 4]), float(prior[0, 1:4].mean()), rel_tol=1e-6)


def test_category_prior_without_classes_is_zero_not_nan() -> None:
    # A platform with no interest classes (all masked out) or a catalogue with none:
    # unlabelled items get no prior (0), never 0/0 = NaN, so item scores stay finite.
    masked = mask_to_platform(torch.tensor([[1.0, 2.0]]), torch.tensor([False, False]))
    assert category_prior(masked)[0, 2].item() == 0.0
    empty = category_prior(torch.zeros(3, 0))
    assert empty.shape == (3, 1) and torch.equal(empty, torch.zeros(3, 1))
    scores = item_scores(torch.ones(3, 4) / 2, torch.zeros(3, 0), torch.ones(5, 4) / 2,
                         torch.zeros(5, dtype=torch.long), 1.0, 1.0)
    assert torch.isfinite(scores).all()
