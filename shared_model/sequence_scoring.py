"""The sequence model's side of THE scoring path (:mod:`shared_model.scoring`): histories →
windows of item vectors → scores of a platform's whole catalogue at the newest position →
history items excluded → rank of the target.

* :func:`platform_candidates`: a platform's catalogue as the model's
  :class:`~shared_model.sequence_model.Candidates` (its item vectors, log priors, categories).
* :func:`rank_sequence_examples`: every example's target ranked among them (its history items
  excluded, the target never), with the masked next-interest logits — per-silo evaluation.
* :class:`HistoryEncoder`: a :class:`~shared_model.scoring.Scorer`'s history → window, with
  events outside the item index (free text typed into ``fedshift recommend``) encoded by the
  frozen base encoder like a catalogue item's text, so a catalogue item costs no encoder pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared_model.schema import DEFAULT_EVENT_TYPE, Catalogue, Event, Example
from shared_model.sequence_model import Candidates, SequenceInput, SequenceModel, last_position_scores
from shared_model.sequences import NO_ROW, SequenceBatcher


def platform_candidates(model: SequenceModel, embeddings: torch.Tensor, item_category: torch.Tensor,
                        rows: torch.Tensor, device: torch.device) -> Candidates:
    """The items of ``rows`` (a platform's catalogue, in catalogue order) as candidates."""
    rows = rows.to(device)
    return Candidates(rows, embeddings[rows.cpu()].to(device), model.log_priors(rows).to(device),
                      item_category[rows.cpu()].to(device))


@torch.inference_mode()
def rank_sequence_examples(model: SequenceModel, batcher: SequenceBatcher, examples: Sequence[Example],
                           cands: Candidates, category_mask: torch.Tensor, category_prior_weight: float,
                           device: torch.device, batch_size: int, what: str = "model scores",
                           target_platform: int | None = None):  # -> scoring.Ranked
    """Each example's target ranked among ``cands`` (history excluded) at its window's newest
    position; ``target_platform``: the candidates' platform index (see :func:`last_position_scores`)."""
    from shared_model.scoring import Ranked, rank_targets

    model.to(device).eval()
    column = {int(r): c for c, r in enumerate(cands.rows.tolist())}
    ranks: list[int] = []
    tied: list[int] = []
    logits: list[torch.Tensor] = []
    cats: list[torch.Tensor] = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        windows = [batcher.window(ex.history) for ex in chunk]
        inp = batcher.batch(windows).to(device)
        scores, cat_logits = last_position_scores(model, inp, cands, category_mask.to(device), category_prior_weight,
                                                  target_platform)
        targets = torch.tensor([column[batcher.item_row[ex.target.item_id]] for ex in chunk])
        seen = [{column[r] for r in w if r in column} for w in windows]
        ranked = rank_targets(scores.float().cpu().clone(), targets, seen, what)
        ranks.extend(ranked.above.tolist())
        tied.extend(ranked.tied.tolist())
        logits.append(cat_logits.float().cpu())
        cats.append(torch.tensor([_category(batcher, ex) for ex in chunk], dtype=torch.long))
    width = len(category_mask)
    return Ranked(np.asarray(ranks, dtype=np.int64), torch.cat(logits) if logits else torch.zeros(0, width),
                  torch.cat(cats) if cats else torch.zeros(0, dtype=torch.long), np.asarray(tied, dtype=np.int64))


def _category(batcher: SequenceBatcher, ex: Example) -> int:
    """The target's category index, or the ignore index (−100) when unlabelled."""
    from shared_model.batches import IGNORE_INDEX

    row = batcher.item_row.get(ex.target.item_id, NO_ROW)
    if row < 0:
        return IGNORE_INDEX
    c = int(batcher.item_category[row])
    return c if c < batcher.num_categories else IGNORE_INDEX


@dataclass
class EncodedHistory:
    """One history as the sequence model reads it: window rows (−1 outside the index), their
    vectors, categories and platforms (index in the catalogue's platforms, −1 unknown)."""

    rows: list[int]
    vectors: torch.Tensor
    cats: list[int]
    platforms: list[int] | None = None


class HistoryEncoder:
    """Histories → :class:`EncodedHistory` and batches of them (see the module docstring)."""

    def __init__(self, batcher: SequenceBatcher, catalogue: Catalogue, category_index: dict[str, int],
                 base_model: str, max_item_tokens: int):
        self.batcher = batcher
        self.catalogue = catalogue
        self.category_index = category_index
        self.base_model = base_model
        self.max_item_tokens = max_item_tokens

    def encode(self, history: Sequence[Event], catalogue: Catalogue | None = None) -> EncodedHistory:
        from shared_model.item_index import encode_texts
        from shared_model.serialize import event_text

        events = list(history)[-self.batcher.max_history:]
        rows = [self.batcher.item_row.get(e.item_id, NO_ROW) for e in events]
        known = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
        vectors = torch.zeros(len(rows), self.batcher.embeddings.shape[1])
        if known.any():
            vectors[known] = self.batcher.embeddings[torch.tensor([r for r in rows if r >= 0])]
        cat = catalogue or self.catalogue
        texts = [event_text(cat.items[e.item_id], DEFAULT_EVENT_TYPE) for e, r in zip(events, rows) if r < 0]
        if texts:  # free text: the frozen base encoder, as the catalogue's vectors were made
            vectors[~known] = encode_texts(texts, self.base_model or None, self.max_item_tokens)
        none = self.batcher.num_categories
        cats = [int(self.batcher.item_category[r]) if r >= 0 else
                self.category_index.get(cat.items[e.item_id].interest or "", none) for e, r in zip(events, rows)]
        index = {p: i for i, p in enumerate(self.catalogue.platforms)}
        plats = [index.get(getattr(cat.items.get(e.item_id), "platform", None) or "", -1) for e in events]
        return EncodedHistory(rows, vectors, cats, plats)

    def batch(self, encoded: Sequence[EncodedHistory]) -> SequenceInput:
        return self.batcher.batch([e.rows for e in encoded], [e.vectors for e in encoded], [e.cats for e in encoded],
                                  [e.platforms for e in encoded])
