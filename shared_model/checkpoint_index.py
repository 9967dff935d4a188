"""The catalogue's item index cached beside a checkpoint (``<checkpoint>/item-index.pt``).

The key is made of the checkpoint files' sha256, the catalogue hash, the base model's
files, ``max-item-tokens`` and ``item-tower``; a changed key rebuilds it (written
atomically: temp file + rename). With the frozen item tower a rebuild reads
:func:`shared_model.item_index.build_item_index`'s shared cache when present; with the
adapted tower (``item-tower = adapted``) the checkpoint's LoRA encoder embeds the whole
catalogue once and only this file caches it.

A cached index that does not load or fails :func:`shared_model.item_index.index_problem`
(wrong shape, non-finite, corrupted bytes: a sha256 of the embeddings is stored beside
them) is rebuilt, and a line on stderr says why.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared_model.adapters import HEADS_FILE, META_FILE
from shared_model.config import RunConfig
from shared_model.encoder import resolve_base_model
from shared_model.item_index import (ItemIndex, build_item_index, catalogue_hash, embed_items, embeddings_sha256,
                                     index_problem, tokenize_items)
from shared_model.model import InterestModel
from shared_model.schema import Catalogue

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
    (``model``) once per checkpoint (its cost: docs/item-tower.md)."""
    t0 = time.perf_counter()
    folder = Path(folder)
    ids = list(catalogue.items)
    platforms = [catalogue.items[i].platform for i in ids]
    key = "|".join((checkpoint_hash(folder)[:24], (cat_hash or catalogue_hash(catalogue))[:24],
                    base_model_stamp(cfg.base_model), str(cfg.max_item_tokens), cfg.item_tower))
    path = folder / INDEX_FILE
    hidden = model.category_head.in_features if model is not None else None
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            why = index_problem(saved, ids, hidden)
        except Exception as e:  # a truncated or corrupted file: rebuilt below, saying so
            saved, why = None, f"unreadable ({type(e).__name__}: {str(e)[:200]})"
        if why is None and saved.get("key") == key:
            return ItemIndex(ids, saved["emb"], platforms), IndexInfo(str(path), "checkpoint-cache", time.perf_counter() - t0)
        if why is not None:
            print(f"{path}: {why}; rebuilding it", file=sys.stderr, flush=True)
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
            torch.save({"key": key, "ids": ids, "emb": index.embeddings,
                        "sha256": embeddings_sha256(index.embeddings)}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        source, where = "rebuilt", str(path)
    except OSError:  # read-only checkpoint folder: the shared cache still serves it
        source, where = "global-cache", "(shared item cache; checkpoint folder not writable)"
    return index, IndexInfo(where, source, time.perf_counter() - t0)
