"""Histories → the sequence model's tensors (:class:`shared_model.sequence_model.SequenceInput`).

* :class:`SequenceBatcher`: a history → its window of item rows (the newest ``max-history``
  events; with ``extra = 1`` one more, the training target of the last position), and a list
  of windows → one right-aligned batch with item vectors, categories and the per-position
  history features (:func:`shared_model.interest_features.sequence_features`).
* :class:`TrainSequences`: one training example per training user — the user's whole window,
  a loss at every position (user-level DP: one Poisson-sampled example is one user) — with the
  user's own released transition pairs (:func:`shared_model.transitions.user_pairs`) for the
  leave-one-out counts of :meth:`SequenceModel.transition_entries`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from shared_model.interest_features import sequence_features
from shared_model.schema import Catalogue, Event, Silo
from shared_model.sequence_model import SequenceInput

NO_ROW = -1


def row_platforms(catalogue: Catalogue, item_ids: Sequence[str]) -> torch.Tensor:
    """``[N]`` each item's platform as its index in ``catalogue.platforms``."""
    index = {p: i for i, p in enumerate(catalogue.platforms)}
    return torch.tensor([index[catalogue.items[i].platform] for i in item_ids], dtype=torch.long)


class SequenceBatcher:
    """Windows of item rows → :class:`SequenceInput` batches, reading item vectors from
    ``embeddings`` (the item tower, ``[N, H]`` in item-row order) and categories from
    ``item_category`` (``[N]``, C for unlabelled items)."""

    def __init__(self, item_row: Mapping[str, int], embeddings: torch.Tensor, item_category: torch.Tensor,
                 num_categories: int, max_history: int, migration_k: int, item_platform: torch.Tensor | None = None):
        self.item_row = item_row
        self.item_platform = item_platform  # [N] each row's platform index (batches then carry it)
        self.embeddings = embeddings
        self.item_category = item_category
        self.num_categories = num_categories
        self.max_history = max_history
        self.k = migration_k

    def window(self, history: Sequence[Event], extra: int = 0) -> list[int]:
        """Item rows of the newest ``max-history + extra`` events, oldest first (an item outside
        the index is :data:`NO_ROW`)."""
        return [self.item_row.get(e.item_id, NO_ROW) for e in history[-(self.max_history + extra):]] if history else []

    def batch(self, windows: Sequence[Sequence[int]], vectors: Sequence[torch.Tensor | None] | None = None,
              categories: Sequence[Sequence[int] | None] | None = None,
              platforms: Sequence[Sequence[int] | None] | None = None) -> SequenceInput:
        """Right-aligned ``[B, T]`` batch of ``windows`` (T: the longest). A row of :data:`NO_ROW`
        needs its vector in ``vectors[b]`` (``[len, H]``, e.g. free text encoded by the base
        encoder) and its category in ``categories[b]`` (and may have its platform in
        ``platforms[b]``, else −1, unknown); otherwise all come from the index."""
        b = len(windows)
        t = max((len(w) for w in windows), default=0) or 1
        rows = torch.full((b, t), NO_ROW, dtype=torch.long)
        real = torch.zeros(b, t, dtype=torch.bool)
        for i, w in enumerate(windows):
            if w:
                rows[i, t - len(w):] = torch.as_tensor(list(w), dtype=torch.long)
                real[i, t - len(w):] = True
        known = rows >= 0
        vecs = self.embeddings[rows.clamp_min(0)] * known.unsqueeze(-1)
        cats = torch.where(known, self.item_category[rows.clamp_min(0)], torch.full_like(rows, self.num_categories))
        cats = torch.where(real, cats, torch.full_like(rows, -1))
        for i, w in enumerate(windows):  # given vectors / categories (free text outside the index)
            start = t - len(w)
            if vectors is not None and vectors[i] is not None:
                vecs[i, start:] = vectors[i]
            if categories is not None and categories[i] is not None:
                cats[i, start:] = torch.as_tensor(list(categories[i]), dtype=torch.long)
        features = sequence_features(cats, self.num_categories, self.k)
        plats = None
        if self.item_platform is not None:
            plats = torch.where(known, self.item_platform[rows.clamp_min(0)], torch.full_like(rows, -1))
            for i, w in enumerate(windows):
                if platforms is not None and platforms[i] is not None and w:
                    plats[i, t - len(w):] = torch.as_tensor(list(platforms[i]), dtype=torch.long)
        return SequenceInput(rows, vecs, cats, features, plats)


PairsOf = Callable[[Sequence[Event]], Sequence[tuple[int, int]]]


class TrainSequences(Dataset):
    """One example per training user (≥ 2 events): ``(window rows [≤ max-history + 1],
    own pairs [m, 2])``; ``pairs_of`` gives the user's released transition pairs as item rows
    (none: no leave-one-out)."""

    def __init__(self, silo: Silo, users: Sequence[str], batcher: SequenceBatcher, pairs_of: PairsOf | None = None,
                 max_pairs: int = 0):
        self.silo = silo
        self.users = list(users)
        self.batcher = batcher
        self.pairs_of = pairs_of
        self.max_pairs = max_pairs

    def __len__(self) -> int:
        return len(self.users)

    def window_length(self, i: int) -> int:
        return min(len(self.silo.histories[self.users[i]]), self.batcher.max_history + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        history = self.silo.histories[self.users[i]]
        rows = torch.as_tensor(self.batcher.window(history, extra=1), dtype=torch.long)
        pairs = torch.full((self.max_pairs, 2), NO_ROW, dtype=torch.long)
        if self.pairs_of is not None and self.max_pairs:
            own = list(self.pairs_of(history))[: self.max_pairs]
            if own:
                pairs[: len(own)] = torch.as_tensor(own, dtype=torch.long)
        return rows, pairs


class LengthSorted:
    """A batch sampler that yields each batch of ``sampler`` (e.g. Opacus' Poisson sampler)
    with its indices sorted by ``length``: the same examples, so the same privacy, but the
    physical batches Opacus' ``BatchMemoryManager`` splits it into hold windows of similar
    length and pad little."""

    def __init__(self, sampler: object, length: Callable[[int], int]):
        self.sampler = sampler
        self.length = length

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in self.sampler:  # type: ignore[attr-defined]
            yield sorted(batch, key=self.length)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class PhysicalBatches:
    """Without DP: each logical batch of ``sampler`` split into physical batches of at most
    ``size`` examples sorted by ``length``; ``last_part`` and ``logical_size`` tell the
    training loop when to step and how to weigh each part."""

    def __init__(self, sampler: object, length: Callable[[int], int], size: int):
        self.sampler = sampler
        self.length = length
        self.size = size
        self.last_part = True
        self.logical_size = 1

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in self.sampler:  # type: ignore[attr-defined]
            batch = sorted(batch, key=self.length)
            parts = [batch[i : i + self.size] for i in range(0, len(batch), self.size)]
            self.logical_size = len(batch)
            for n, part in enumerate(parts):
                self.last_part = n == len(parts) - 1
                yield part

    def __len__(self) -> int:
        return len(self.sampler) * 2  # type: ignore[arg-type]


def collate_sequences(batcher: SequenceBatcher) -> Callable[[Sequence[tuple[torch.Tensor, torch.Tensor]]],
                                                             tuple[torch.Tensor, ...]]:
    """A DataLoader ``collate_fn``: ``[(rows, pairs), …]`` → the tensors ``(rows, vectors, cats,
    features, pairs)`` of :func:`unpack` (plain tensors, so Opacus' Poisson loader can build an
    empty batch of the same structure)."""
    def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        inp = batcher.batch([it[0].tolist() for it in items])
        pairs = torch.stack([it[1] for it in items]) if items else torch.zeros(0, 0, 2, dtype=torch.long)
        return inp.rows, inp.vectors, inp.cats, inp.features, pairs
    return collate


def unpack(batch: Sequence[torch.Tensor]) -> tuple[SequenceInput, torch.Tensor] | None:
    """A collated batch → ``(SequenceInput, own pairs [B, m, 2])``; ``None`` for an empty Poisson
    batch (in whatever form the loader produced it)."""
    if len(batch) != 5 or batch[0].shape[0] == 0:
        return None
    rows, vectors, cats, features, pairs = batch
    return SequenceInput(rows, vectors, cats, features), pairs
