"""The adapted item tower (``item-tower = adapted``): each example's candidate items are
encoded inside that example's rows of one encoder call, so after
:func:`fold_grad_samples` Opacus holds exactly each example's own gradient."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from fl_client.dp_train import adapted_interest_loss, fold_grad_samples, interest_loss, pick_device, train_round
from fl_client.evaluate import evaluate_silo
from fl_client.task import TrainUsers, evaluation_examples, open_silo
from shared_model.privacy.state import PrivacyState
from shared_model.adapters import get_trainable_state
from shared_model.batches import collate
from shared_model.config import RunConfig
from shared_model.examples import train_user_ids
from shared_model.item_index import embed_items
from shared_model.model import build_model


def _cfg(dataset: Path, bert: Path, **kw: object) -> RunConfig:
    base = {"user-tower": "text", "dataset": str(dataset), "base-model": str(bert), "local-steps": 3, "batch-size": 8,
            "num-server-rounds": 2, "max-eval-users": 40, "item-tower": "adapted", "tower-negatives": 4,
            "eval-candidates": 50}
    return RunConfig.from_run_config({**base, **kw})


def _perturb_lora_b(model: torch.nn.Module) -> None:
    """LoRA B starts at zero (then the adapted tower equals the frozen one); make it non-zero
    so gradients flow into lora_A too."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.slow  # trains with Opacus
def test_folded_grad_samples_equal_each_examples_own_gradient(small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> None:
    cfg = _cfg(small_dataset, tiny_bert)
    data = open_silo(cfg, {"partition-id": 0})
    model = build_model(cfg, num_categories=len(data.categories))
    _perturb_lora_b(model)
    reference = copy.deepcopy(model)
    dataset = TrainUsers(data, cfg, seed=1)
    batch = collate([dataset[i] for i in range(5)], dataset.encode.tokenizer.pad_token_id or 0)
    rows = data.items.platform_rows(data.platform)
    negatives = rows[torch.randint(len(rows), (5, cfg.tower_negatives), generator=torch.Generator().manual_seed(2))]
    args = (data.item_tokens, data.item_prior_index, data.category_mask, negatives, cfg)

    gsm = GradSampleModule(model, loss_reduction="mean")
    adapted_interest_loss(gsm, batch, *args).backward()
    fold_grad_samples(gsm, 5)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {p.grad_sample.shape[0] for _, p in trainable} == {5}

    ref_params = dict(reference.named_parameters())
    for b in range(5):  # example b alone, plain autograd, no Opacus
        one = tuple(t[b : b + 1] for t in batch)
        loss = adapted_interest_loss(reference, one, data.item_tokens, data.item_prior_index, data.category_mask,
                                     negatives[b : b + 1], cfg)
        grads = torch.autograd.grad(loss, [ref_params[n] for n, _ in trainable])
        for (name, p), g in zip(trainable, grads):
            torch.testing.assert_close(p.grad_sample[b], g, rtol=1e-4, atol=1e-6, msg=f"example {b}, {name}")
    # the item rows really carry gradient: lora_A of the encoder is non-zero for every example
    lora_a = [p for n, p in trainable if "lora_A" in n]
    assert all(float(p.grad_sample.abs().sum()) > 0 for p in lora_a)


@pytest.mark.parametrize("tower", ["frozen", "adapted"])
def test_only_the_next_interest_loss_trains_the_next_interest_head(tower: str, small_dataset: Path, tiny_bert: Path,
                                                                    cache_dir: Path) -> None:
    """With ``category-prior-gradient = false`` the item loss reaches the next-interest head
    through no path (its ``log p(category)`` term is detached); with true it does."""
    grads = {}
    for flows in (False, True):
        cfg = _cfg(small_dataset, tiny_bert, **{"item-tower": tower, "category-loss-weight": 0.0,
                                                "category-prior-gradient": flows})
        data = open_silo(cfg, {"partition-id": 0})
        model = build_model(cfg, num_categories=len(data.categories), seed=0)
        dataset = TrainUsers(data, cfg, seed=1)
        batch = collate([dataset[i] for i in range(4)], dataset.encode.tokenizer.pad_token_id or 0)
        rows = data.items.platform_rows(data.platform)
        g = torch.Generator().manual_seed(2)
        if tower == "adapted":
            negatives = rows[torch.randint(len(rows), (4, cfg.tower_negatives), generator=g)]
            loss = adapted_interest_loss(model, batch, data.item_tokens, data.item_prior_index, data.category_mask,
                                         negatives, cfg)
        else:
            negatives = rows[torch.randint(len(rows), (16,), generator=g)]
            loss = interest_loss(model, batch, data.items.embeddings, data.item_prior_index, data.category_mask,
                                 negatives, cfg)
        head = [p for n, p in model.named_parameters() if n.startswith("category_head") and p.requires_grad]
        assert head
        grad = torch.autograd.grad(loss, head, allow_unused=True)
        grads[flows] = sum(0.0 if x is None else float(x.abs().sum()) for x in grad)
    assert grads[False] == 0.0 and grads[True] > 0.0


@pytest.mark.slow  # trains with Opacus
def test_adapted_dp_round_trains_and_evaluates_on_sampled_candidates(small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> None:
    cfg = _cfg(small_dataset, tiny_bert)
    data = open_silo(cfg, {"partition-id": 1})
    model = build_model(cfg, num_categories=len(data.categories))
    before = get_trainable_state(model)
    privacy = PrivacyState.calibrate(data.name, cfg, len(train_user_ids(data.silo)))
    result = train_round(model, data, cfg, privacy, seed=5, device=pick_device(cfg))
    after = get_trainable_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in after if "lora_B" in k)
    assert result.steps == cfg.local_steps
    assert result.history == [(privacy.noise_multiplier, privacy.sample_rate, cfg.local_steps)]

    ev = evaluate_silo(model, data, cfg, pick_device(cfg))
    assert ev.users == len(evaluation_examples(data, cfg)) > 0 and ev.candidates == cfg.eval_candidates + 1
    assert 0.0 <= ev.ndcg10 <= ev.hr10 <= 1.0
    # the adapted tower at LoRA B = 0 is the frozen base encoder: same item vectors
    fresh = build_model(cfg, num_categories=len(data.categories)).eval()
    some = torch.arange(30)
    adapted = embed_items(fresh.embed, data.item_tokens, some, torch.device("cpu"))
    torch.testing.assert_close(adapted, data.items.embeddings[some], rtol=1e-4, atol=1e-5)


def test_adapted_checkpoint_index_is_the_lora_encoder(
    tmp_path: Path, small_dataset: Path, tiny_bert: Path, cache_dir: Path
) -> None:
    from shared_model.adapters import save_checkpoint
    from shared_model.dataset import load_catalogue
    from shared_model.scorer import Scorer

    cfg = _cfg(small_dataset, tiny_bert, **{"eval-candidates": 0, "max-eval-users": 0})
    categories = load_catalogue(small_dataset).interest_vocab()
    model = build_model(cfg, len(categories), seed=3)
    _perturb_lora_b(model)
    meta = {"round": 1, "base-model": str(tiny_bert), "categories": categories, "config": cfg.to_run_config()}
    folder = save_checkpoint(model, tmp_path / "round-001", meta)

    scorer = Scorer.from_checkpoint(folder)
    data = open_silo(scorer.cfg, {"partition-id": 0})
    assert scorer.index.item_ids == data.items.item_ids
    some = torch.arange(0, len(data.items.item_ids), 7)
    expected = embed_items(model.eval().embed, data.item_tokens, some, torch.device("cpu"))
    torch.testing.assert_close(scorer.index.embeddings[some], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(scorer.index.embeddings[some], data.items.embeddings[some], atol=1e-3)
    assert Scorer.from_checkpoint(folder).index_info.source == "checkpoint-cache"  # type: ignore[union-attr]


def test_bad_tower_settings_are_named() -> None:
    with pytest.raises(ValueError, match="item-tower = 'shared'"):
        RunConfig.from_run_config({"item-tower": "shared"})
    with pytest.raises(ValueError, match="tower-negatives = 0"):
        RunConfig.from_run_config({"item-tower": "adapted", "tower-negatives": 0})
    with pytest.raises(ValueError, match="grad-sample-mode"):
        RunConfig.from_run_config({"item-tower": "adapted", "grad-sample-mode": "ew"})


@pytest.mark.slow  # trains with Opacus
def test_tower_benchmark_prints_both_towers(small_dataset: Path, tiny_bert: Path, cache_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.benchmarks.item_tower import main

    assert main(["--steps", "1", "--negatives", "2", "--batch-size", "8", "--dataset", str(small_dataset),
                 "--base-model", str(tiny_bert)]) == 0
    out = capsys.readouterr().out
    assert "item-tower frozen" in out and "item-tower adapted, K = 2" in out and "×" in out
