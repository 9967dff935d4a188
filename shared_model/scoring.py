"""One scoring path for a saved checkpoint: histories → next-item scores over a platform's
catalogue and a next-interest distribution.

It is the model's own path: ``history_text`` under the ``max-seq-len`` token budget (as
:class:`fl_client.task.Encoder`), the LoRA user tower, ``mask_to_platform`` and
``item_scores`` from :mod:`shared_model.model`. ``fedshift evaluate`` and ``fedshift
recommend`` both use :class:`Scorer`.

Item index beside the checkpoint: :func:`checkpoint_item_index` keeps the catalogue's item
embeddings in ``<checkpoint>/item-index.pt`` with a key made of the checkpoint files'
sha256, the catalogue hash, the base model's files and ``max-item-tokens``; a changed key rebuilds
it (written atomically: temp file + rename). With the frozen item tower a
rebuild reads :func:`shared_model.item_index.build_item_index`'s shared cache when present;
with the adapted tower (``item-tower = adapted``) the checkpoint's LoRA encoder embeds the
whole catalogue once and only this file caches it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_model.adapters import HEADS_FILE, META_FILE, checkpoint_config, load_checkpoint, read_metadata
from shared_model.config import RunConfig
from shared_model.dataset import load_catalogue
from shared_model.encoder import resolve_base_model, shared_tokenizer
from shared_model.item_index import ItemIndex, build_item_index, catalogue_hash, embed_items, tokenize_items
from shared_model.interest_features import history_features
from shared_model.model import InterestModel, item_scores, mask_to_platform
from shared_model.schema import Catalogue, Event
from shared_model.serialize import history_text

INDEX_FILE = "item-index.pt"
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", HEADS_FILE, META_FILE)


def checkpoint_hash(folder: str | os.PathLike[str]) -> str:
    """sha256 over the checkpoint's adapter, heads and metadata files."""
    digest = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        p = Path(folder) / name
        if p.is_file():
            digest.update(name.encode() + b"\0")
            digest.update(p.read_bytes())
    return digest.hexdigest()


def base_model_stamp(base_model: str | None) -> str:
    """Cheap identity of the base encoder: its folder and its weight/config files' sizes and
    mtimes (a full :func:`shared_model.encoder.model_hash` reads ~90 MB on every load)."""
    path = resolve_base_model(base_model or None)
    digest = hashlib.sha256(str(path).encode())
    for p in sorted(path.iterdir()):
        if p.is_file() and (p.suffix in {".safetensors", ".bin"} or p.name == "config.json"):
            st = p.stat()
            digest.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


@dataclass
class IndexInfo:
    """Where the item index came from, for the printed timing."""

    path: str
    source: str  # "checkpoint-cache" | "rebuilt" | "global-cache"
    seconds: float


def checkpoint_item_index(
    folder: Path,
    catalogue: Catalogue,
    cfg: RunConfig,
    cat_hash: str | None = None,
    model: InterestModel | None = None,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> tuple[ItemIndex, IndexInfo]:
    """The catalogue's item index cached beside the checkpoint (see module docstring).

    ``item-tower = adapted`` embeds the catalogue with the checkpoint's own LoRA encoder
    (``model``), ≈19k items per platform: minutes on a CPU, once per checkpoint."""
    t0 = time.perf_counter()
    folder = Path(folder)
    ids = list(catalogue.items)
    platforms = [catalogue.items[i].platform for i in ids]
    key = "|".join((checkpoint_hash(folder)[:24], (cat_hash or catalogue_hash(catalogue))[:24],
                    base_model_stamp(cfg.base_model), str(cfg.max_item_tokens), cfg.item_tower))
    path = folder / INDEX_FILE
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key and list(saved["ids"]) == ids:
                return ItemIndex(ids, saved["emb"], platforms), IndexInfo(str(path), "checkpoint-cache", time.perf_counter() - t0)
        except Exception:  # unreadable or stale cache: rebuild below
            pass
    if cfg.item_tower == "adapted":
        if model is None:
            raise ValueError(f"{folder / META_FILE}: config.item-tower 'adapted' needs the checkpoint's model to embed the catalogue")
        tokens = tokenize_items(catalogue, ids, cfg.base_model or None, cfg.max_item_tokens)
        emb = embed_items(model.to(device).eval().embed, tokens, torch.arange(len(ids)), device, progress=progress)
        index = ItemIndex(ids, emb, platforms)
    else:
        index = build_item_index(catalogue, cfg.base_model or None, cfg.max_item_tokens, progress=progress)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".item-index-", suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"key": key, "ids": ids, "emb": index.embeddings}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        source, where = "rebuilt", str(path)
    except OSError:  # read-only checkpoint folder: the shared cache still serves it
        source, where = "global-cache", "(shared item cache; checkpoint folder not writable)"
    return index, IndexInfo(where, source, time.perf_counter() - t0)


@dataclass
class Scorer:
    """A loaded checkpoint with its catalogue, item index and tokenizer."""

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
        self.tokenizer = shared_tokenizer(self.cfg.base_model)
        self._count = lru_cache(maxsize=65536)(lambda s: len(self.tokenizer.tokenize(s)))
        cat_index = {c: i for i, c in enumerate(self.categories)}
        self.category_index = cat_index
        self.prior_index = torch.tensor(
            [cat_index.get(self.catalogue.items[i].interest or "", len(self.categories)) for i in self.index.item_ids],
            dtype=torch.long)
        self._platform: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
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
        for name in ("adapter_model.safetensors", HEADS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing checkpoint file")
        model, meta = load_checkpoint(folder, base_model)
        cfg = checkpoint_config(meta, base_model)
        t1 = time.perf_counter()
        dataset_dir = Path(dataset) if dataset else cfg.dataset_dir()
        if not dataset_dir.is_dir():
            source = "--dataset" if dataset else f"{folder / META_FILE} config.dataset"
            raise FileNotFoundError(f"{dataset_dir}: dataset folder not found (from {source}; pass --dataset)")
        catalogue = load_catalogue(dataset_dir)
        categories = catalogue.interest_vocab()
        if list(meta["categories"]) != categories:
            raise ValueError(f"{folder / META_FILE}: categories {meta['categories']} differ from the catalogue's "
                             f"level-2 categories {categories} in {dataset_dir}")
        t2 = time.perf_counter()
        index, info = checkpoint_item_index(folder, catalogue, cfg, model=model, device=torch.device(device))
        scorer = cls(model, cfg, catalogue, index, categories, meta, torch.device(device), info)
        scorer.timings = {"load-model": t1 - t0, "load-catalogue": t2 - t1, "item-index": info.seconds}
        scorer.dataset_dir = dataset_dir
        return scorer

    def platform_tensors(self, platform: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(candidate rows, candidate embeddings, candidate category index, category mask) of a platform."""
        if platform not in self._platform:
            rows = self.index.platform_rows(platform)
            present = {it.interest for it in self.catalogue.items.values() if it.platform == platform}
            mask = torch.tensor([c in present for c in self.categories], dtype=torch.bool)
            self._platform[platform] = (rows, self.index.embeddings[rows].to(self.device),
                                        self.prior_index[rows].to(self.device), mask.to(self.device))
        return self._platform[platform]

    def encode_history(self, history: Sequence[Event], catalogue: Catalogue | None = None) -> tuple[list[int], torch.Tensor]:
        """Token ids and ``[C, F]`` history features, exactly as :class:`fl_client.task.Encoder` builds them."""
        budget = self.cfg.max_seq_len - 2  # [CLS] and [SEP]
        cat = catalogue or self.catalogue
        text = history_text(history, cat, max_tokens=budget, count_tokens=self._count)
        ids = self.tokenizer(text, truncation=True, max_length=self.cfg.max_seq_len)["input_ids"]
        return ids, history_features(history, cat, self.category_index, self.cfg.migration_k)

    @torch.inference_mode()
    def score(self, encoded: Sequence[tuple[Sequence[int], torch.Tensor]], platform: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, N_p] item scores over the platform's catalogue order, [B, C] next-interest probabilities)``
        for histories encoded by :meth:`encode_history`."""
        rows, cand, cand_prior, mask = self.platform_tensors(platform)
        pad = self.tokenizer.pad_token_id or 0
        longest = max(len(t) for t, _ in encoded)
        ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
        att = torch.zeros((len(encoded), longest), dtype=torch.long)
        for r, (t, _) in enumerate(encoded):
            ids[r, : len(t)] = torch.as_tensor(t, dtype=torch.long)
            att[r, : len(t)] = 1
        feats = torch.stack([f for _, f in encoded]).to(self.device)
        user, logits = self.model(ids.to(self.device), att.to(self.device), feats)
        logits = mask_to_platform(logits, mask)
        scores = item_scores(user, logits, cand, cand_prior, self.cfg.logit_scale, self.cfg.category_prior_weight)
        return scores.cpu(), torch.softmax(logits, -1).cpu()

    def predict(self, histories: Sequence[Sequence[Event]], platform: str, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batched :meth:`score` over event histories → numpy ``(scores, probabilities)``."""
        bs = batch_size or self.cfg.eval_batch_size
        out_s, out_p = [], []
        for s in range(0, len(histories), bs):
            sc, pr = self.score([self.encode_history(h) for h in histories[s : s + bs]], platform)
            out_s.append(sc.numpy())
            out_p.append(pr.numpy())
        n = len(self.index.platform_rows(platform))
        if not out_s:
            return np.zeros((0, n), np.float32), np.zeros((0, len(self.categories)), np.float32)
        return np.concatenate(out_s), np.concatenate(out_p)
