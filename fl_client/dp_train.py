"""One round of local DP-SGD on a silo (Opacus), and the loss both training and
evaluation use.

Privacy argument (Abadi et al., CCS 2016, "Deep Learning with Differential Privacy"):
each step Poisson-samples *users* (one example per user), clips each example's gradient
to ``max-grad-norm`` and adds Gaussian noise ``σ·C``. An example's loss depends only on
that example and public data: its own target item, and negatives drawn from the public
catalogue of the silo's platform — never other users' items — and the popularity prior
(``popularity-prior``), a differentially private release of the silos' item counts that the
silo's accountant has already charged (adaptive composition: a later mechanism may depend on
an earlier DP output; the ledger composes both).

Randomness: every random choice of a round comes from explicit generators seeded from the
round's ``seed`` (:func:`sub_seed` per purpose): the Poisson sampling (the DataLoader's
generator, which Opacus's DPDataLoader takes over), the Gaussian noise
(``make_private(noise_generator=…)``), the history cuts of the training examples and the
public negatives. A federated silo derives ``seed`` from its own secret
(:mod:`shared_model.privacy.silo_secret`), so the server cannot know who was sampled or
what noise was added.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from fl_client.task import SiloData, TrainUsers
from shared_model.batches import IGNORE_INDEX, collate
from shared_model.privacy.state import PrivacyState
from shared_model.item_index import ItemTokens
from shared_model.config import RunConfig
from shared_model.model import (InterestModel, category_prior, item_scores, last_item_similarity, mask_to_platform,
                                own_item_scores)


def interest_loss(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, ...],
    item_emb: torch.Tensor,
    prior_index: torch.Tensor,
    category_mask: torch.Tensor,
    negatives: torch.Tensor,
    cfg: RunConfig,
) -> torch.Tensor:
    """Frozen item tower: mean over the batch of ``w_item·CE(next item) + w_cat·CE(next interest)``.

    The next-item term is a softmax over the example's own target and ``negatives``
    (rows of the public platform catalogue, shared by the batch: their embeddings are
    constants, so sharing them couples no two examples); a negative equal to the target
    is masked.
    """
    input_ids, mask, rows, cats, feats, last = batch
    user, cat_logits = model(input_ids, mask, feats)
    cat_logits = mask_to_platform(cat_logits, category_mask)
    item_cat = _item_loss_category_logits(cat_logits, cfg)
    # the additive terms (popularity prior, newest history item) of the target and the negatives
    # in ONE call of each head (Opacus per-sample gradients)
    inner = getattr(model, "_module", model)
    cand = torch.cat([rows.unsqueeze(1), negatives.unsqueeze(0).expand(len(rows), -1)], 1)  # [B, 1+K]
    sim = (last_item_similarity(item_emb[last.clamp_min(0)], last >= 0, item_emb[cand], cfg.logit_scale)
           if inner.last_item_head is not None else None)
    extra = inner.extra_scores(cand, sim)
    pos = own_item_scores(user, item_cat, item_emb[rows], prior_index[rows], cfg.logit_scale, cfg.category_prior_weight,
                          None if extra is None else extra[:, 0])
    neg = item_scores(user, item_cat, item_emb[negatives], prior_index[negatives], cfg.logit_scale,
                      cfg.category_prior_weight, None if extra is None else extra[:, 1:])
    neg = neg.masked_fill(negatives.unsqueeze(0) == rows.unsqueeze(1), float("-inf"))
    return _combined_loss(pos, neg, cat_logits, cats, cfg)


def adapted_interest_loss(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, ...],
    item_tokens: ItemTokens,
    prior_index: torch.Tensor,
    category_mask: torch.Tensor,
    negatives: torch.Tensor,
    cfg: RunConfig,
) -> torch.Tensor:
    """Adapted item tower: the same loss, with example b's target and its own negatives
    ``negatives[b]`` (``[B, K]`` public platform rows) encoded by the LoRA encoder in b's
    rows of one encoder call (:meth:`InterestModel.forward_with_items`)."""
    input_ids, mask, rows, cats, feats, last = batch
    cand_rows = torch.cat([rows.unsqueeze(1), negatives], dim=1)  # [B, 1+K]
    inner = getattr(model, "_module", model)  # Opacus' GradSampleModule: hooks sit on the submodules
    with_last = inner.last_item_head is not None  # the newest history item is encoded in b's rows too
    encoded_rows = torch.cat([cand_rows, last.clamp_min(0).unsqueeze(1)], dim=1) if with_last else cand_rows
    item_ids, item_mask = item_tokens.take(encoded_rows.cpu())
    user, cat_logits, items = inner.forward_with_items(input_ids, mask, feats, item_ids.to(input_ids.device), item_mask.to(input_ids.device))
    sim = last_item_similarity(items[:, -1], last >= 0, items[:, :-1], cfg.logit_scale) if with_last else None
    items = items[:, :-1] if with_last else items
    cat_logits = mask_to_platform(cat_logits, category_mask)
    prior = category_prior(_item_loss_category_logits(cat_logits, cfg)).gather(1, prior_index[cand_rows])  # [B, 1+K]
    scores = cfg.logit_scale * (items * user.unsqueeze(1)).sum(-1).float() + cfg.category_prior_weight * prior
    extra = inner.extra_scores(cand_rows, sim)
    if extra is not None:
        scores = scores + extra.float()
    neg = scores[:, 1:].masked_fill(negatives == rows.unsqueeze(1), float("-inf"))
    return _combined_loss(scores[:, 0], neg, cat_logits, cats, cfg)


def _item_loss_category_logits(cat_logits: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """The next-interest logits as the item score's category term sees them: detached unless
    ``category-prior-gradient``, so that only the next-interest loss trains the next-interest
    head (the item loss's pull through ``log p(category)`` competes with it: docs/results.md).
    Detaching changes only which loss a gradient comes from; each example's gradient is still
    its own (per-example clipping is unaffected)."""
    return cat_logits if cfg.category_prior_gradient else cat_logits.detach()


def _combined_loss(
    pos: torch.Tensor, neg: torch.Tensor, cat_logits: torch.Tensor, cats: torch.Tensor, cfg: RunConfig
) -> torch.Tensor:
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    item_loss = F.cross_entropy(logits, torch.zeros_like(cats), reduction="none")
    cat_loss = F.cross_entropy(cat_logits, cats, ignore_index=IGNORE_INDEX, reduction="none")
    per_example = cfg.item_loss_weight * item_loss + cfg.category_loss_weight * cat_loss
    return per_example.sum() / max(len(cats), 1)


def fold_grad_samples(model: torch.nn.Module, batch_size: int) -> None:
    """Sum Opacus' per-row gradients back to per-example gradients.

    With the adapted item tower one encoder call holds ``R = 1 + 1 + K`` rows per example
    (example-major), so the encoder's ``grad_sample`` is ``[B·R, …]`` while the category
    head's is ``[B, …]``. Example b's gradient is the sum over its R rows; Opacus scaled
    each row by the layer's row count ``B·R`` instead of ``B`` (``loss_reduction="mean"``
    multiplies backprops by ``max_batch_len``), hence the division by R. After this every
    ``grad_sample`` is exactly the gradient of example b's own loss, and clipping and
    noise act per example as the accountant assumes.
    """
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None or gs.shape[0] == batch_size:
            continue
        if gs.shape[0] % batch_size:
            raise RuntimeError(f"grad_sample of {tuple(p.shape)} has {gs.shape[0]} rows, not a multiple of batch {batch_size}")
        rows = gs.shape[0] // batch_size
        p.grad_sample = gs.view(batch_size, rows, *gs.shape[1:]).sum(1) / rows


@dataclass
class RoundResult:
    loss: float
    steps: int
    examples: int
    empty_steps: int
    seconds: float
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    epsilon_round: float = 0.0  # filled in by the caller that writes the ledger
    epsilon_total: float = 0.0
    history: list[tuple[float, float, int]] = field(default_factory=list)
    clipping: dict[str, dict[str, float]] = field(default_factory=dict)  # per clipping group (sequence model)


#: Few-coordinate head parameters that learn at ``head-learning-rate``: θ of the history
#: features (shared and per category), the per-category biases (the class prior) and the
#: popularity prior's weight. With Adam a coordinate moves at
#: most ≈ lr per step, so at ``learning-rate`` they could not leave their zero start within a
#: DP run of a few dozen steps; they are a handful of coordinates, so the noise each one
#: gets stays small next to the signal every example carries.
FAST_PARAMETERS = ("history_head.shared", "history_head.per_category", "category_head.bias", "popularity_head.weight")


def parameter_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict[str, object]]:
    """AdamW groups: :data:`FAST_PARAMETERS` at ``head-learning-rate``, the rest (LoRA,
    the category head's weights) at ``learning-rate``."""
    named = [(n.removeprefix("_module."), p) for n, p in model.named_parameters() if p.requires_grad]
    fast = [p for n, p in named if n in FAST_PARAMETERS]
    groups: list[dict[str, object]] = [{"params": [p for n, p in named if n not in FAST_PARAMETERS]}]
    if fast:
        groups.append({"params": fast, "lr": cfg.head_learning_rate})
    return groups


def sub_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose (``sampling``, ``noise``, ``history``, ``negatives``) of a round."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8], "little") & (2**63 - 1)


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def train_round(
    model: InterestModel,
    data: SiloData,
    cfg: RunConfig,
    privacy: PrivacyState,
    seed: int,
    device: torch.device,
) -> RoundResult:
    """Train ``local-steps`` DP-SGD steps; the accountant continues ``privacy.history``. The
    sequence model (``user-tower = sequence``) trains in :mod:`fl_client.sequence_train`."""
    if cfg.user_tower == "sequence":
        from fl_client.sequence_train import train_sequence_round

        return train_sequence_round(model, data, cfg, privacy, seed, device)  # type: ignore[arg-type]
    torch.manual_seed(sub_seed(seed, "torch"))  # dropout, if any; sampling and noise have their own generators
    dataset = TrainUsers(data, cfg, seed=sub_seed(seed, "history"))
    if len(dataset) == 0:
        raise ValueError(f"silo {data.name}: no training users")
    pad_id = dataset.encode.tokenizer.pad_token_id or 0
    loader = DataLoader(
        dataset,
        batch_size=min(cfg.batch_size, len(dataset)),
        shuffle=not cfg.dp,
        collate_fn=lambda b: collate(b, pad_id, len(data.categories)),
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(sub_seed(seed, "sampling")),  # DPDataLoader's Poisson sampler
    )
    model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.learning_rate)
    engine = None
    if cfg.dp:
        engine = PrivacyEngine(accountant=cfg.accountant)
        engine.accountant.history = list(privacy.history)
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=cfg.grad_sample_mode,
            noise_generator=torch.Generator(device=device).manual_seed(sub_seed(seed, "noise")),
        )
    adapted = cfg.item_tower == "adapted"
    item_tokens = data.item_tokens if adapted else None
    item_emb = None if adapted else data.items.embeddings.to(device)
    prior_index = data.item_prior_index.to(device)
    category_mask = data.category_mask.to(device)
    platform_rows = data.items.platform_rows(data.platform).to(device)
    neg_gen = torch.Generator(device="cpu").manual_seed(sub_seed(seed, "negatives"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()

    t0 = time.perf_counter()
    losses: list[float] = []
    steps = examples = empty = 0
    while steps < cfg.local_steps:
        for batch in loader:
            if steps >= cfg.local_steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(batch) == 0 or batch[0].shape[0] == 0:
                _noise_only_step(optimizer)
                empty += 1
                steps += 1
                continue
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            size = batch[0].shape[0]
            if adapted:
                pick = torch.randint(len(platform_rows), (size, cfg.tower_negatives), generator=neg_gen)
                negatives = platform_rows[pick.to(device)]
                with autocast:
                    loss = adapted_interest_loss(model, batch, item_tokens, prior_index, category_mask, negatives, cfg)
                loss.backward()
                if engine is not None:
                    fold_grad_samples(model, size)
            else:
                pick = torch.randint(len(platform_rows), (cfg.num_negatives,), generator=neg_gen)
                negatives = platform_rows[pick.to(device)]
                with autocast:
                    loss = interest_loss(model, batch, item_emb, prior_index, category_mask, negatives, cfg)
                loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            examples += batch[0].shape[0]
            steps += 1
    seconds = time.perf_counter() - t0
    result = RoundResult(
        loss=sum(losses) / len(losses) if losses else math.nan,
        steps=steps,
        examples=examples,
        empty_steps=empty,
        seconds=seconds,
    )
    if engine is not None:
        result.noise_multiplier = privacy.noise_multiplier
        result.sample_rate = loader.sample_rate if hasattr(loader, "sample_rate") else privacy.sample_rate
        result.history = [tuple(h) for h in engine.accountant.history]  # type: ignore[misc]
        result.epsilon_total = float(engine.accountant.get_epsilon(delta=cfg.delta))
    _drop_grad_samples(model)
    return result


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch: zero per-sample gradients, so the step adds noise only and
    the accountant still counts it (skipping it would under-report ε)."""
    for p in optimizer.params:  # type: ignore[attr-defined]
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()


def _drop_grad_samples(model: torch.nn.Module) -> None:
    for p in model.parameters():
        if hasattr(p, "grad_sample"):
            p.grad_sample = None
        p.grad = None


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
