"""Examples and histories → model tensors, and the public per-item / per-platform lookups
the scoring needs.

* :class:`ExampleBatcher`: a history → token ids (``history_text`` under the
  ``max-seq-len`` token budget) and ``[C, F]`` history features; an example → those plus its
  target item row, target category index and its newest history item's row.
* :func:`collate`: pad a list of encoded examples into one batch.
* :func:`prior_index`: each item row's category index (the next-item head's category prior).
* :func:`platform_category_mask`: which next-interest classes occur on a platform.

Training (:mod:`fl_client.dp_train`), per-silo evaluation and the checkpoint scorer
(:mod:`shared_model.scoring`) all build their tensors here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch

from shared_model.config import RunConfig
from shared_model.encoder import shared_tokenizer
from shared_model.interest_features import FEATURES, history_features
from shared_model.schema import Catalogue, Event, Example
from shared_model.serialize import history_text

IGNORE_INDEX = -100  # target category of an example whose next item is unlabelled
NO_ITEM = -1  # last-item row of a history whose newest item is not in the item index


def platform_category_mask(catalogue: Catalogue, categories: Sequence[str], platform: str) -> torch.Tensor:
    """``[C]`` bool: which next-interest classes occur on ``platform`` (public catalogue)."""
    present = {it.interest for it in catalogue.items.values() if it.platform == platform}
    return torch.tensor([c in present for c in categories], dtype=torch.bool)


def prior_index(catalogue: Catalogue, item_ids: Sequence[str], categories: Sequence[str]) -> torch.Tensor:
    """Each item row's category index (``len(categories)`` for unlabelled items)."""
    index = {c: i for i, c in enumerate(categories)}
    return torch.tensor(
        [index.get(catalogue.items[i].interest or "", len(categories)) for i in item_ids], dtype=torch.long
    )


class ExampleBatcher:
    """History → (input ids, history features ``[C, F]``); example → (input ids, target item
    row, target category index, history features)."""

    def __init__(self, catalogue: Catalogue, categories: Sequence[str], cfg: RunConfig,
                 item_row: Mapping[str, int] | None = None):
        self.catalogue = catalogue
        self.cfg = cfg
        self.item_row = item_row or {}
        self.tokenizer = shared_tokenizer(cfg.base_model)
        self.category_index = {c: i for i, c in enumerate(categories)}
        self._count = lru_cache(maxsize=65536)(lambda s: len(self.tokenizer.tokenize(s)))

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def history(self, history: Sequence[Event], catalogue: Catalogue | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and ``[C, F]`` history features of one history (serialised with
        ``catalogue``, default the batcher's own)."""
        cat = catalogue or self.catalogue
        budget = self.cfg.max_seq_len - 2  # [CLS] and [SEP]
        text = history_text(history, cat, max_tokens=budget, count_tokens=self._count)
        ids = self.tokenizer(text, truncation=True, max_length=self.cfg.max_seq_len)["input_ids"]
        feats = history_features(history, cat, self.category_index, self.cfg.migration_k)
        return torch.tensor(ids, dtype=torch.long), feats

    def last_row(self, history: Sequence[Event], platform: str | None = None) -> int:
        """The item row of the history's newest event on ``platform`` (any platform when
        ``None``); :data:`NO_ITEM` when there is none or it is not in the index. The newest-item
        term compares candidates with what the user last did on the candidates' own platform: a
        history from another platform (a cross-platform case) has no newest item there."""
        for ev in reversed(history):
            item = self.catalogue.items.get(ev.item_id)
            if platform is None or (item is not None and item.platform == platform):
                return self.item_row.get(ev.item_id, NO_ITEM)
        return NO_ITEM

    def __call__(self, ex: Example) -> tuple[torch.Tensor, int, int, torch.Tensor, int]:
        ids, feats = self.history(ex.history)
        cat = self.category_index.get(ex.target_category, IGNORE_INDEX) if ex.target_category else IGNORE_INDEX
        target = self.catalogue.items.get(ex.target.item_id)
        last = self.last_row(ex.history, target.platform if target is not None else None)
        return ids, self.item_row[ex.target.item_id], cat, feats, last


def collate(batch: Sequence[tuple], pad_id: int = 0, num_categories: int = 0) -> tuple[torch.Tensor, ...]:
    """Pad to the longest history in the batch → (input_ids, attention_mask, item_rows,
    categories, history features ``[B, C, F]``, last-item rows); an entry is ``(ids, row, cat,
    feats[, last_row])`` (:data:`NO_ITEM` when it has no last row)."""
    if not batch:
        empty = torch.zeros((0, 1), dtype=torch.long)
        feats = torch.zeros((0, num_categories, len(FEATURES)))
        none = torch.zeros(0, dtype=torch.long)
        return empty, empty, none, none, feats, none
    longest = max(len(b[0]) for b in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for r, b in enumerate(batch):
        input_ids[r, : len(b[0])] = b[0]
        mask[r, : len(b[0])] = 1
    rows = torch.tensor([b[1] for b in batch], dtype=torch.long)
    cats = torch.tensor([b[2] for b in batch], dtype=torch.long)
    feats = torch.stack([b[3] for b in batch])
    last = torch.tensor([b[4] if len(b) > 4 else NO_ITEM for b in batch], dtype=torch.long)
    return input_ids, mask, rows, cats, feats, last
