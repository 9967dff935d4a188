"""One round of user-level DP-SGD on a silo for the sequence model (``user-tower = sequence``).

The large-batch recipe (Li et al., ICLR 2022, "Large Language Models Can Be Strong
Differentially Private Learners"; De et al. 2022, "Unlocking High-Accuracy Differentially
Private Image Classification through Scale"): Poisson sampling of *users* at an expected batch
of ``batch-size`` (hundreds), one example per user — the user's whole window with a loss at
every position (:func:`shared_model.sequence_loss.sequence_loss`) — per-example clipping per
parameter group (:class:`fl_client.group_clipping.GroupClipDPOptimizer`), Gaussian noise, and
Opacus' ``BatchMemoryManager`` splitting each logical batch into physical batches of
``physical-batch-size`` so memory stays flat. Learning rate: linear warm-up over
``warmup-steps``, then constant.

Randomness comes from the round's ``seed`` as in :mod:`fl_client.dp_train` (sampling, noise,
shared candidates), so a federated silo's draws come from its own secret.
"""

from __future__ import annotations

import math
import time

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from fl_client.dp_train import RoundResult, _drop_grad_samples, _noise_only_step, sub_seed
from fl_client.group_clipping import GroupClipDPOptimizer
from fl_client.task import SiloData
from shared_model.config import RunConfig
from shared_model.examples import train_user_ids
from shared_model.privacy.state import PrivacyState
from shared_model.sequence_loss import sequence_loss
from shared_model.sequence_model import SequenceModel
from shared_model.sequences import LengthSorted, PhysicalBatches, TrainSequences, collate_sequences, unpack
from shared_model.transitions import user_pairs

#: Parameter groups, each clipped on its own (names as in :class:`SequenceModel`).
INTEREST_PREFIXES = ("category_head.", "history_head.")


def clip_groups(model: torch.nn.Module, cfg: RunConfig) -> list[tuple[str, list[torch.nn.Parameter], float]]:
    """``[("ranking", …, 1 − share), ("interest", …, share)]`` with ``share = interest-clip-share``;
    a group with no trainable parameter is left out and the other takes all of ``C²``."""
    named = [(n.removeprefix("_module."), p) for n, p in model.named_parameters() if p.requires_grad]
    interest = [p for n, p in named if n.startswith(INTEREST_PREFIXES)]
    ranking = [p for n, p in named if not n.startswith(INTEREST_PREFIXES)]
    if not interest or not ranking:
        return [("interest" if interest else "ranking", interest or ranking, 1.0)]
    return [("ranking", ranking, 1.0 - cfg.interest_clip_share), ("interest", interest, cfg.interest_clip_share)]


#: Matrices (trained at ``learning-rate``); every other parameter is a handful of numbers (the
#: pooling and score weights, the history-feature head, the category biases), trained at
#: ``head-learning-rate`` so that a few dozen noisy steps can move it (Adam moves a coordinate
#: by at most about the learning rate per step).
MATRICES = ("category_head.weight", "adaptor_down.weight", "adaptor_up.weight")


def optimizer_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict[str, object]]:
    """Adam groups: :data:`MATRICES` at ``learning-rate``, the rest at ``head-learning-rate``."""
    named = [(n.removeprefix("_module."), p) for n, p in model.named_parameters() if p.requires_grad]
    groups: list[dict[str, object]] = [
        {"params": [p for n, p in named if n in MATRICES], "lr": cfg.learning_rate},
        {"params": [p for n, p in named if n not in MATRICES], "lr": cfg.head_learning_rate}]
    return [g for g in groups if g["params"]]


def training_set(data: SiloData, cfg: RunConfig) -> TrainSequences:
    """The silo's training users as user-level examples, with their own released pairs."""
    batcher = data.sequence_batcher(cfg)
    rows = data.items.row
    pairs = (lambda h: user_pairs([rows.get(e.item_id, -1) for e in h], cfg.transition_max_pairs)) if cfg.transitions else None
    return TrainSequences(data.silo, train_user_ids(data.silo), batcher, pairs, cfg.transition_max_pairs if cfg.transitions else 0)


def shared_candidates(data: SiloData, cfg: RunConfig, generator: torch.Generator) -> torch.Tensor:
    """Each of the silo's platforms' rows (``num-negatives = 0``) or a uniform sample of
    ``num-negatives`` of them, concatenated (a region silo: one sample per platform, so each
    target's platform is sampled at the same rate as on a platform silo)."""
    parts = []
    for p in data.platforms:
        rows = data.items.platform_rows(p)
        if 0 < cfg.num_negatives < len(rows):
            rows = rows[torch.randperm(len(rows), generator=generator)[: cfg.num_negatives]]
        parts.append(rows)
    return torch.cat(parts)


def train_sequence_round(model: SequenceModel, data: SiloData, cfg: RunConfig, privacy: PrivacyState, seed: int,
                         device: torch.device) -> RoundResult:
    """Train ``local-steps`` logical DP-SGD steps; the accountant continues ``privacy.history``."""
    torch.manual_seed(sub_seed(seed, "torch"))
    dataset = training_set(data, cfg)
    if len(dataset) == 0:
        raise ValueError(f"silo {data.name}: no training users")
    loader = DataLoader(dataset, batch_size=min(cfg.batch_size, len(dataset)), shuffle=not cfg.dp,
                        collate_fn=collate_sequences(dataset.batcher),
                        generator=torch.Generator().manual_seed(sub_seed(seed, "sampling")))
    if not cfg.dp:  # logical batches of shuffled users, split into sorted physical batches
        loader = DataLoader(dataset, batch_sampler=PhysicalBatches(loader.batch_sampler, dataset.window_length,
                                                                   cfg.physical_batch_size),
                            collate_fn=loader.collate_fn)
    model.to(device).train()
    optimizer: torch.optim.Optimizer = torch.optim.Adam(optimizer_groups(model, cfg))
    engine = None
    if cfg.dp:
        engine = PrivacyEngine(accountant=cfg.accountant)
        engine.accountant.history = list(privacy.history)
        model, flat, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, grad_sample_mode=cfg.grad_sample_mode,
            noise_generator=torch.Generator(device=device).manual_seed(sub_seed(seed, "noise")))
        optimizer = GroupClipDPOptimizer(flat.original_optimizer, groups=clip_groups(model, cfg),
                                         noise_multiplier=privacy.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                                         expected_batch_size=flat.expected_batch_size, loss_reduction="mean",
                                         generator=flat.generator)
        optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=loader.sample_rate))
        sample_rate = loader.sample_rate
        loader = DataLoader(dataset, batch_sampler=LengthSorted(loader.batch_sampler, dataset.window_length),
                            collate_fn=loader.collate_fn, generator=loader.generator)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    items = data.item_space(device)
    cand_gen = torch.Generator().manual_seed(sub_seed(seed, "negatives"))
    t0 = time.perf_counter()
    losses: list[float] = []
    steps = examples = empty = 0

    def set_lr(step: int) -> None:
        scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * scale

    def physical(batches):  # type: ignore[no-untyped-def]
        if engine is None:  # without DP: the same physical batches, gradients accumulated per logical step
            yield from batches
            return
        with BatchMemoryManager(data_loader=batches, max_physical_batch_size=cfg.physical_batch_size,
                                optimizer=optimizer) as split:
            yield from split

    while steps < cfg.local_steps:
        for batch in physical(loader):
            if steps >= cfg.local_steps:
                break
            set_lr(steps)
            last_part = engine is None or not optimizer._check_skip_next_step(pop_next=False)  # type: ignore[attr-defined]
            unpacked = unpack(batch)
            if unpacked is None:  # an empty Poisson batch: a noise-only step, still accounted
                _noise_only_step(optimizer)
                optimizer.zero_grad(set_to_none=True)
                empty += 1
                steps += 1
                continue
            inp, pairs = unpacked
            inp = inp.to(device)
            if engine is None:
                last_part = loader.batch_sampler.last_part  # type: ignore[union-attr]
            loss, _ = sequence_loss(model, inp, pairs.to(device), items, shared_candidates(data, cfg, cand_gen),
                                    cfg.item_loss_weight, cfg.category_loss_weight, cfg.category_prior_weight,
                                    cfg.loss_top_k)
            if engine is None:  # the physical batch's share of the logical batch's mean loss
                (loss * inp.rows.shape[0] / loader.batch_sampler.logical_size).backward()  # type: ignore[union-attr]
            else:
                loss.backward()
            if last_part or engine is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            examples += inp.rows.shape[0]
            if last_part:
                steps += 1
    result = RoundResult(loss=sum(losses) / len(losses) if losses else math.nan, steps=steps, examples=examples,
                         empty_steps=empty, seconds=time.perf_counter() - t0)
    if engine is not None:
        result.noise_multiplier = privacy.noise_multiplier
        result.sample_rate = sample_rate
        result.history = [tuple(h) for h in engine.accountant.history]  # type: ignore[misc]
        result.epsilon_total = float(engine.accountant.get_epsilon(delta=cfg.delta))
        result.clipping = optimizer.clip_report()  # type: ignore[attr-defined]
    _drop_grad_samples(model)
    return result
