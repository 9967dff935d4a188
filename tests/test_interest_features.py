"""Per-category history features of the next-interest head, checked by hand, and the head
learning θ under DP-SGD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared_model.interest_features import FEATURES, RECENCY_DECAY, history_features
from shared_model.schema import Catalogue, Event, Item


def _catalogue() -> Catalogue:
    items = {
        "a1": Item("a1", "arts", "A1", ("Arts", "Paint")),
        "a2": Item("a2", "arts", "A2", ("Arts", "Paint")),
        "b1": Item("b1", "arts", "B1", ("Arts", "Knit")),
        "u1": Item("u1", "arts", "U1", ()),  # unlabelled
        "c1": Item("c1", "office", "C1", ("Office", "Desk")),
    }
    return Catalogue(items, ("arts", "office"))


def test_features_by_hand() -> None:
    cat = _catalogue()
    index = {"Paint": 0, "Knit": 1, "Desk": 2}
    assert [cat.items[i].interest for i in ("a1", "b1", "c1", "u1")] == ["Paint", "Knit", "Desk", None]
    # oldest → newest: Paint, Paint, Knit, Desk, unlabelled; k = 3 → recent = Knit, Desk, (unlabelled)
    history = [Event("u", "a1", 1), Event("u", "a2", 2), Event("u", "b1", 3), Event("u", "c1", 4), Event("u", "u1", 5)]
    f = history_features(history, cat, index, k=3)
    assert f.shape == (3, len(FEATURES))
    torch.testing.assert_close(f[:, 0], torch.tensor([0.0, 0.0, 1.0]))  # last labelled: Desk
    torch.testing.assert_close(f[:, 1], torch.tensor([0.0, 0.5, 0.5]))  # last 3 events: Knit, Desk
    torch.testing.assert_close(f[:, 2], torch.tensor([0.5, 0.25, 0.25]))  # all labelled events
    d = RECENCY_DECAY  # ages (newest 0): u1 0, c1 1, b1 2, a2 3, a1 4
    w = torch.tensor([d**3 + d**4, d**2, d**1])
    torch.testing.assert_close(f[:, 3], w / w.sum())
    assert history_features([Event("u", "u1", 1)], cat, index, k=3).abs().sum() == 0
    assert history_features([], cat, index, k=3).abs().sum() == 0


@pytest.mark.slow  # trains with Opacus
def test_history_head_learns_under_dp(small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> None:
    from fl_client.dp_train import pick_device, train_round
    from shared_model.privacy.state import PrivacyState
    from fl_client.task import open_silo
    from shared_model.config import RunConfig
    from shared_model.examples import train_user_ids
    from shared_model.model import build_model

    cfg = RunConfig.from_run_config({"dataset": str(small_dataset), "base-model": str(tiny_bert),
                                     "local-steps": 4, "batch-size": 16})
    data = open_silo(cfg, {"partition-id": 0})
    model = build_model(cfg, num_categories=len(data.categories))
    assert model.history_head is not None
    assert all(float(p.abs().sum()) == 0.0 for p in model.history_head.parameters())
    privacy = PrivacyState.calibrate(data.name, cfg, len(train_user_ids(data.silo)))
    train_round(model, data, cfg, privacy, seed=3, device=pick_device(cfg))
    theta = model.history_head.shared.detach()
    delta = model.history_head.per_category.detach()
    # δ of the categories of other platforms gets no gradient (masked logits), only noise
    assert float(delta.abs().max()) > 0
    # Adam moves each coordinate by at most ≈ lr per step; θ moved at its own, larger rate
    assert 0 < float(theta.abs().max()) <= cfg.head_learning_rate * cfg.local_steps * 1.01
    assert float(theta.abs().max()) > 10 * cfg.learning_rate

    off = build_model(RunConfig.from_run_config({**cfg.to_run_config(), "history-features": False}), len(data.categories))
    assert off.history_head is None
    assert not any(n.startswith("history_head") for n, _ in off.named_parameters())


@pytest.mark.parametrize("features", [True, False])
def test_checkpoint_round_trip_keeps_history_head(tmp_path: Path, small_dataset: Path, tiny_bert: Path, features: bool) -> None:
    from shared_model.adapters import get_trainable_state, load_checkpoint, save_checkpoint
    from shared_model.config import RunConfig
    from shared_model.model import build_model

    cfg = RunConfig(dataset=str(small_dataset), base_model=str(tiny_bert), history_features=features)
    model = build_model(cfg, 5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    folder = save_checkpoint(model, tmp_path / "ck", {"categories": list("abcde"), "config": cfg.to_run_config()})
    loaded, _ = load_checkpoint(folder)
    a, b = get_trainable_state(model), get_trainable_state(loaded)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("history_head.") for k in a) == features


def test_checkpoint_from_before_history_features_loads_without_theta(tmp_path: Path, small_dataset: Path, tiny_bert: Path) -> None:
    from shared_model.adapters import load_checkpoint, save_checkpoint
    from shared_model.config import RunConfig
    from shared_model.model import build_model

    cfg = RunConfig(dataset=str(small_dataset), base_model=str(tiny_bert), history_features=False)
    old_config = {k: v for k, v in cfg.to_run_config().items() if k not in {"history-features", "head-learning-rate"}}
    folder = save_checkpoint(build_model(cfg, 5), tmp_path / "old", {"categories": list("abcde"), "config": old_config})
    loaded, _ = load_checkpoint(folder)
    assert loaded.history_head is None
