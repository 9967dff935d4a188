"""THE scoring path: histories → user vectors and platform-masked next-interest logits →
scores of candidate items → history items excluded → rank of the target.

* :func:`user_vectors`: the LoRA user tower and next-interest head, logits restricted to the
  target platform's categories (:func:`shared_model.model.mask_to_platform`).
* :class:`ItemTower` and :func:`candidates`: the items a batch is scored against — frozen
  item rows (the base encoder's index, or a checkpoint's cached index), the adapted tower
  (the model's own LoRA encoder over the tokenised catalogue), or a seeded sample of
  ``sample`` items drawn once (the same for every user) that always holds the target: each
  user's own target is scored in column 0, and a target drawn into the sample too is ranked
  once.
* :func:`score_candidates`: :func:`shared_model.model.item_scores` over the candidates, with
  the model's additive terms (the popularity prior of each candidate's own platform; the
  similarity to the user's newest history item in the same tower).
* :func:`exclude_history`: the one history exclusion (score −inf; the target never is).
* :func:`rank_of_target`: the one ranking (0-based): how many candidates score above the
  target and how many tie with it. Ties are broken uniformly at random *in expectation*:
  the metrics (:mod:`shared_model.metrics`) are the expected values over every order of a
  tie, so a model whose scores are all equal scores chance level (HR@k = k/N), not 1.
  A non-finite score (NaN, +inf, or −inf at a target) is a :class:`ScoringError`, never a
  rank; −inf elsewhere marks an excluded history item.
* :func:`rank_examples`: all of it over a list of examples (per-silo evaluation).
* :class:`shared_model.scorer.Scorer`: a loaded checkpoint with its catalogue and cached item
  index (:mod:`shared_model.checkpoint_index`): ``fedshift evaluate``, ``fedshift recommend``,
  the evaluation harness and the experiment score through it.

Predictors that are not the model (the harness's baselines) produce their own scores and
share :func:`exclude_history` and :func:`rank_of_target` through
:func:`rank_targets`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from shared_model.batches import ExampleBatcher, collate
from shared_model.config import RunConfig
from shared_model.item_index import ItemTokens, embed_items
from shared_model.model import InterestModel, item_scores, last_item_similarity, mask_to_platform, own_item_scores
from shared_model.schema import Example


def user_vectors(model: InterestModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 features: torch.Tensor, category_mask: torch.Tensor | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit user vectors ``[B, H]`` and next-interest logits ``[B, C]``, masked to the
    platform's categories (``category_mask``; ``None`` leaves them unmasked)."""
    user, logits = model(input_ids.to(device), attention_mask.to(device), features.to(device))
    if category_mask is not None:
        logits = mask_to_platform(logits, category_mask.to(device))
    return user, logits


@dataclass
class ItemTower:
    """Item vectors and each item row's category index (:func:`shared_model.batches.prior_index`):
    fixed ``embeddings`` (frozen tower, or a checkpoint's cached index), or ``embed`` (the
    model's adapted encoder, :meth:`InterestModel.embed`) over the tokenised catalogue."""

    prior_index: torch.Tensor
    embeddings: torch.Tensor | None = None
    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    tokens: ItemTokens | None = None

    def vectors(self, rows: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
        """``[len(rows), H]`` unit vectors of item ``rows``, on ``device``."""
        if self.embeddings is not None:
            return self.embeddings[rows].to(device)
        if self.embed is None or self.tokens is None:
            raise ValueError("an item tower needs embeddings or an encoder with the tokenised catalogue")
        return embed_items(self.embed, self.tokens, rows, device, batch_size).to(device)


@dataclass
class Candidates:
    """The items every user of a batch is scored against, in item-row order.

    With ``own_target`` (a sample), score column 0 is each user's own target through that
    tower and candidate ``c`` is column ``c + 1``."""

    rows: torch.Tensor
    emb: torch.Tensor  # [N, H] on the scoring device
    prior: torch.Tensor  # [N] category index, on the scoring device
    own_target: ItemTower | None = None
    tower: ItemTower | None = None  # the tower the vectors come from (users' newest items are read from it)

    def __post_init__(self) -> None:
        shift = 1 if self.own_target is not None else 0
        self.column = {int(r): c + shift for c, r in enumerate(self.rows.tolist())}

    @property
    def size(self) -> int:
        """Items each target is ranked among (itself included)."""
        return len(self.rows) + (1 if self.own_target is not None else 0)

    def target_columns(self, target_rows: torch.Tensor) -> torch.Tensor:
        if self.own_target is not None:
            return torch.zeros(len(target_rows), dtype=torch.long)
        return torch.tensor([self.column[int(r)] for r in target_rows])

    def seen_columns(self, history_rows: Iterable[int | None], target_row: int) -> set[int]:
        """Columns of a user's history items; in a sample also the target's second copy
        (when it was drawn too), so that it is ranked once, at column 0."""
        cols = {self.column[r] for r in history_rows if r in self.column}
        if self.own_target is not None and target_row in self.column:
            cols.add(self.column[target_row])
        return cols


def sample_rows(rows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` of ``rows`` drawn with ``seed`` (the same draw for every user, round and silo),
    kept in row order."""
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]
    return rows[pick.sort().values]


def candidates(tower: ItemTower, rows: torch.Tensor, device: torch.device, batch_size: int = 256,
               sample: int = 0, seed: int = 0) -> Candidates:
    """All of ``rows``, or (``0 < sample < len(rows)``) a seeded sample of them that each
    user's own target joins at column 0."""
    sampled = 0 < sample < len(rows)
    if sampled:
        rows = sample_rows(rows, sample, seed)
    emb = tower.vectors(rows, device, batch_size)
    return Candidates(rows, emb, tower.prior_index[rows].to(device), tower if sampled else None, tower)


def score_candidates(user: torch.Tensor, category_logits: torch.Tensor, cands: Candidates, cfg: RunConfig,
                     target_rows: torch.Tensor | None = None, model: InterestModel | None = None,
                     last_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N]`` scores (on the CPU) of the candidates; with a sample ``[B, 1 + N]``, column 0
    each user's own target (``target_rows``). ``model``'s additive terms are added when it has
    them: the popularity prior of each candidate's own platform, and (``last_rows``: each user's
    newest history item on the candidates' platform, :data:`~shared_model.batches.NO_ITEM` for
    none: :meth:`ExampleBatcher.last_row`) the newest item's similarity in the candidates' tower."""
    device = user.device
    last = None
    if model is not None and model.last_item_head is not None and last_rows is not None and cands.tower is not None:
        valid = last_rows >= 0
        last = (cands.tower.vectors(last_rows.clamp_min(0), device), valid)
    extra = (model.extra_scores(cands.rows.to(device).unsqueeze(0), None if last is None else
                                last_item_similarity(last[0], last[1], cands.emb, cfg.logit_scale))
             if model is not None else None)
    scores = item_scores(user, category_logits, cands.emb, cands.prior, cfg.logit_scale,
                         cfg.category_prior_weight, extra).cpu()
    if cands.own_target is not None:
        if target_rows is None:
            raise ValueError("sampled candidates need the targets' item rows")
        tower = cands.own_target
        own_emb = tower.vectors(target_rows, device)
        own_extra = (model.extra_scores(target_rows.to(device).unsqueeze(1), None if last is None else
                                        last_item_similarity(last[0], last[1], own_emb.unsqueeze(1), cfg.logit_scale))
                     if model is not None else None)
        own = own_item_scores(user, category_logits, own_emb, tower.prior_index[target_rows].to(device), cfg.logit_scale,
                              cfg.category_prior_weight, None if own_extra is None else own_extra[:, 0]).cpu()
        scores = torch.cat([own.unsqueeze(1), scores], dim=1)
    return scores


def exclude_history(scores: torch.Tensor, seen: Sequence[Iterable[int]],
                    targets: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """In place: row ``r``'s score is −inf at every column of ``seen[r]`` (its history items)
    except its target column ``targets[r]``, which is never excluded."""
    for r, cols in enumerate(seen):
        drop = {int(c) for c in cols}
        if targets is not None:
            drop.discard(int(targets[r]))
        if drop:
            scores[r, sorted(drop)] = float("-inf")
    return scores


class ScoringError(ValueError):
    """Scores that cannot be ranked (not finite); the message names what was scored."""


@dataclass
class TargetRanks:
    """Per row: candidates scored strictly above the target (``above``, its best 0-based
    rank) and other candidates tied with it (``tied``); its expected rank under a random
    order of the tie is ``above + tied / 2`` (:attr:`mid`)."""

    above: torch.Tensor
    tied: torch.Tensor

    @property
    def mid(self) -> torch.Tensor:
        return self.above.double() + self.tied.double() / 2

    def tolist(self) -> list[tuple[int, int]]:
        return list(zip(self.above.tolist(), self.tied.tolist()))


def check_finite(scores: torch.Tensor, target: torch.Tensor, what: str = "scores") -> None:
    """Raise :class:`ScoringError` naming ``what`` and the rows when a score is NaN or +inf,
    or a target's score is −inf (−inf elsewhere is an excluded item)."""
    bad = torch.isnan(scores) | torch.isposinf(scores)
    target_score = scores.gather(1, target.view(-1, 1)).squeeze(1)
    rows = (bad.any(1) | torch.isneginf(target_score)).nonzero().flatten().tolist()
    if rows:
        nans = int(torch.isnan(scores).sum())
        raise ScoringError(f"{what}: {len(rows)} of {len(scores)} row(s) have non-finite scores "
                           f"(first rows {rows[:5]}; {nans} NaN); a non-finite score cannot be ranked")


def rank_of_target(scores: torch.Tensor, target: torch.Tensor, what: str = "scores") -> TargetRanks:
    """Each row's target column: candidates above it and tied with it (see :class:`TargetRanks`).
    Raises :class:`ScoringError` (naming ``what``) on a non-finite score."""
    target = target.view(-1)
    check_finite(scores, target, what)
    target_score = scores.gather(1, target.view(-1, 1))
    return TargetRanks((scores > target_score).sum(1), (scores == target_score).sum(1) - 1)


def rank_targets(scores: torch.Tensor, targets: torch.Tensor, seen: Sequence[Iterable[int]],
                 what: str = "scores") -> TargetRanks:
    """:func:`exclude_history` then :func:`rank_of_target`."""
    return rank_of_target(exclude_history(scores, seen, targets), targets, what)


def top_items(scores: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    """The ``k`` best columns of one row of scores (excluded ones never), best first.
    Raises :class:`ScoringError` on a NaN or +inf score."""
    if torch.isnan(scores).any() or torch.isposinf(scores).any():
        raise ScoringError(f"recommendation scores: {int(torch.isnan(scores).sum())} NaN and "
                           f"{int(torch.isposinf(scores).sum())} +inf of {scores.numel()}; a non-finite score cannot be ranked")
    top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
    return top.values.tolist(), top.indices.tolist()


@dataclass
class Ranked:
    """Per example: the target's rank (candidates above it) and tie size, the masked
    next-interest logits and the true category."""

    ranks: np.ndarray
    category_logits: torch.Tensor
    categories: torch.Tensor
    tied: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@torch.inference_mode()
def rank_examples(model: InterestModel, batcher: ExampleBatcher, examples: Sequence[Example],
                  cands: Candidates, category_mask: torch.Tensor, cfg: RunConfig,
                  device: torch.device, what: str = "model scores") -> Ranked:
    """Each example's target ranked among ``cands`` (its history items excluded), in batches
    of ``eval-batch-size``."""
    model.to(device).eval()
    ranks: list[int] = []
    tied: list[int] = []
    logits: list[torch.Tensor] = []
    cats: list[torch.Tensor] = []
    for s in range(0, len(examples), cfg.eval_batch_size):
        chunk = examples[s : s + cfg.eval_batch_size]
        input_ids, mask, target_rows, true_cats, feats, last = collate([batcher(ex) for ex in chunk], batcher.pad_id)
        user, cat_logits = user_vectors(model, input_ids, mask, feats, category_mask, device)
        scores = score_candidates(user, cat_logits, cands, cfg, target_rows, model, last)
        seen = [cands.seen_columns({batcher.item_row.get(e.item_id) for e in ex.history}, int(target_rows[i]))
                for i, ex in enumerate(chunk)]
        ranked = rank_targets(scores, cands.target_columns(target_rows), seen, what)
        ranks.extend(ranked.above.tolist())
        tied.extend(ranked.tied.tolist())
        logits.append(cat_logits.cpu())
        cats.append(true_cats)
    width = len(batcher.category_index)
    return Ranked(np.asarray(ranks, dtype=np.int64),
                  torch.cat(logits) if logits else torch.zeros(0, width),
                  torch.cat(cats) if cats else torch.zeros(0, dtype=torch.long), np.asarray(tied, dtype=np.int64))
