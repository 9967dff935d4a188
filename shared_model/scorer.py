"""A loaded checkpoint as a scorer: :class:`Scorer` holds the model, its catalogue and the item
index cached beside the checkpoint (:mod:`shared_model.checkpoint_index`), and scores histories
over a platform's whole catalogue through :mod:`shared_model.scoring` (the text tower) or
:mod:`shared_model.sequence_scoring` (the sequence model). ``fedshift evaluate``,
``fedshift recommend``, the evaluation harness and the experiment score through it.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from shared_model.adapters import HEADS_FILE, META_FILE, checkpoint_config, load_checkpoint, read_metadata
from shared_model.batches import ExampleBatcher, collate, platform_category_mask, prior_index
from shared_model.checkpoint_index import IndexInfo, checkpoint_item_index
from shared_model.config import RunConfig
from shared_model.dataset import load_catalogue
from shared_model.item_index import ItemIndex, catalogue_hash
from shared_model.model import InterestModel
from shared_model.schema import Catalogue, Event
from shared_model.scoring import Candidates, ItemTower, candidates, score_candidates, user_vectors


@dataclass
class Scorer:
    """A loaded checkpoint with its catalogue, item index (its rows are the item tower) and
    batcher."""

    model: InterestModel
    cfg: RunConfig
    catalogue: Catalogue
    index: ItemIndex
    categories: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    index_info: IndexInfo | None = None
    dataset_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tower = ItemTower(prior_index(self.catalogue, self.index.item_ids, self.categories),
                               embeddings=self.index.embeddings)
        self.sequence = self.cfg.user_tower == "sequence"
        if self.sequence:
            from shared_model.sequence_scoring import HistoryEncoder
            from shared_model.sequences import SequenceBatcher, row_platforms

            seq = SequenceBatcher(self.index.row, self.index.embeddings, self.tower.prior_index, len(self.categories),
                                  self.cfg.max_history, self.cfg.migration_k,
                                  row_platforms(self.catalogue, self.index.item_ids))
            self.history_encoder = HistoryEncoder(seq, self.catalogue, {c: i for i, c in enumerate(self.categories)},
                                                  self.cfg.base_model, self.cfg.max_item_tokens)
        else:
            self.batcher = ExampleBatcher(self.catalogue, self.categories, self.cfg, self.index.row)
        self._platform: dict[str, tuple[Any, torch.Tensor]] = {}
        self.model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, folder: str | os.PathLike[str], dataset: str | os.PathLike[str] | None = None,
                        base_model: str | None = None, device: str = "cpu") -> "Scorer":
        """Load model, catalogue (the run's dataset unless ``dataset``) and the cached item index.

        Raises FileNotFoundError for a missing checkpoint and ValueError when the catalogue's
        categories differ from the checkpoint's."""
        t0 = time.perf_counter()
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: checkpoint folder not found")
        try:
            meta = read_metadata(folder)
        except ValueError as e:  # json.JSONDecodeError
            raise ValueError(f"{folder / META_FILE}: not valid JSON: {e}") from None
        for key in ("config", "categories"):
            if key not in meta:
                raise ValueError(f"{folder / META_FILE}: missing field {key!r}")
        needed = (HEADS_FILE,) if meta.get("config", {}).get("user-tower") == "sequence" else ("adapter_model.safetensors",
                                                                                              HEADS_FILE)
        for name in needed:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing checkpoint file")
        try:
            model, meta = load_checkpoint(folder, base_model)
        except (SafetensorError, RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as e:
            raise ValueError(f"{folder}: cannot load the checkpoint's arrays ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else 'truncated or corrupted'})") from None
        cfg = checkpoint_config(meta, base_model)
        t1 = time.perf_counter()
        dataset_dir = Path(dataset) if dataset else cfg.dataset_dir()
        if not dataset_dir.is_dir():
            source = "--dataset" if dataset else f"{folder / META_FILE} config.dataset"
            raise FileNotFoundError(f"{dataset_dir}: dataset folder not found (from {source}; pass --dataset)")
        catalogue = load_catalogue(dataset_dir, cfg.base_model or None, cfg.max_item_tokens)
        cat_hash = catalogue_hash(catalogue)
        if meta.get("catalogue-sha256") and meta["catalogue-sha256"] != cat_hash:
            raise ValueError(f"{dataset_dir}: its catalogue (sha256 {cat_hash[:12]}) is not the one the checkpoint "
                             f"was trained on ({meta['catalogue-sha256'][:12]}, {folder / META_FILE}); "
                             "score a checkpoint on its own catalogue")
        categories = catalogue.interest_vocab()
        if list(meta["categories"]) != categories:
            raise ValueError(f"{folder / META_FILE}: categories {meta['categories']} differ from the catalogue's "
                             f"interest classes {categories} in {dataset_dir}")
        t2 = time.perf_counter()
        index, info = checkpoint_item_index(folder, catalogue, cfg, cat_hash, model=model, device=torch.device(device))
        scorer = cls(model, cfg, catalogue, index, categories, meta, torch.device(device), info)
        scorer.timings = {"load-model": t1 - t0, "load-catalogue": t2 - t1, "item-index": info.seconds}
        scorer.dataset_dir = dataset_dir
        return scorer

    def platform(self, platform: str) -> tuple[Candidates, torch.Tensor]:
        """(the platform's whole catalogue as candidates, its category mask)."""
        if platform not in self._platform:
            if self.sequence:
                from shared_model.sequence_scoring import platform_candidates

                cands = platform_candidates(self.model, self.index.embeddings, self.tower.prior_index,  # type: ignore[arg-type]
                                            self.index.platform_rows(platform), self.device)
            else:
                cands = candidates(self.tower, self.index.platform_rows(platform), self.device)
            mask = platform_category_mask(self.catalogue, self.categories, platform).to(self.device)
            self._platform[platform] = (cands, mask)
        return self._platform[platform]

    def encode_history(self, history: Sequence[Event], platform: str | None = None,
                       catalogue: Catalogue | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token ids, ``[C, F]`` history features (:meth:`ExampleBatcher.history`) and the row of
        the newest item on ``platform``, the platform that will be scored
        (:meth:`ExampleBatcher.last_row`)."""
        if self.sequence:
            return self.history_encoder.encode(history, catalogue)  # type: ignore[return-value]
        ids, feats = self.batcher.history(history, catalogue)
        return ids, feats, self.batcher.last_row(history, platform)

    @torch.inference_mode()
    def score(self, encoded: Sequence[tuple[torch.Tensor, torch.Tensor, int]], platform: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, N_p] item scores over the platform's catalogue order, [B, C] next-interest probabilities)``
        for histories encoded by :meth:`encode_history`."""
        cands, mask = self.platform(platform)
        if self.sequence:
            from shared_model.sequence_model import last_position_scores

            inp = self.history_encoder.batch(encoded).to(self.device)  # type: ignore[arg-type]
            scores, logits = last_position_scores(self.model, inp, cands, mask, self.cfg.category_prior_weight,  # type: ignore[arg-type]
                                                  self.catalogue.platforms.index(platform))
            return scores.float().cpu(), torch.softmax(logits.float(), -1).cpu()
        input_ids, att, _, _, feats, last = collate([(ids, 0, 0, f, r) for ids, f, r in encoded], self.batcher.pad_id)
        user, logits = user_vectors(self.model, input_ids, att, feats, mask, self.device)
        scores = score_candidates(user, logits, cands, self.cfg, model=self.model, last_rows=last)
        return scores, torch.softmax(logits, -1).cpu()

    def predict(self, histories: Sequence[Sequence[Event]], platform: str, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batched :meth:`score` over event histories → numpy ``(scores, probabilities)``."""
        bs = batch_size or self.cfg.eval_batch_size
        out_s, out_p = [], []
        for s in range(0, len(histories), bs):
            sc, pr = self.score([self.encode_history(h, platform) for h in histories[s : s + bs]], platform)
            out_s.append(sc.numpy())
            out_p.append(pr.numpy())
        n = len(self.index.platform_rows(platform))
        if not out_s:
            return np.zeros((0, n), np.float32), np.zeros((0, len(self.categories)), np.float32)
        return np.concatenate(out_s), np.concatenate(out_p)
