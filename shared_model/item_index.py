"""The item tower: catalogue items embedded by the frozen base encoder, cached on disk.

Items are public, so their embeddings carry no private data; with the base encoder frozen
they are computed once per (base model, catalogue, token budget) and reused by every silo,
the server and ``recommend``. The cache file is written atomically under a file lock, so
concurrent silo processes compute it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import sys
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared_model.encoder import load_encoder, load_tokenizer, mean_pool, model_hash
from shared_model.schema import DEFAULT_EVENT_TYPE, Catalogue
from shared_model.serialize import event_text


def cache_dir() -> Path:
    """``$FEDSHIFT_CACHE`` or ``~/.cache/fedshift``."""
    return Path(os.environ.get("FEDSHIFT_CACHE", Path.home() / ".cache" / "fedshift"))


def catalogue_hash(catalogue: Catalogue) -> str:
    """sha256 over every item's id, platform and catalogue text (order-independent)."""
    digest = hashlib.sha256()
    for item_id in sorted(catalogue.items):
        item = catalogue.items[item_id]
        digest.update(f"{item_id}\t{item.platform}\t{event_text(item, DEFAULT_EVENT_TYPE)}\n".encode())
    return digest.hexdigest()


@dataclass
class ItemIndex:
    """Unit-norm item embeddings in catalogue order, with per-platform row sets."""

    item_ids: list[str]
    embeddings: torch.Tensor
    platforms: list[str]

    def __post_init__(self) -> None:
        self.row = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self._platform_rows: dict[str, torch.Tensor] = {}
        for p in sorted(set(self.platforms)):
            self._platform_rows[p] = torch.tensor(
                [i for i, q in enumerate(self.platforms) if q == p], dtype=torch.long
            )

    def platform_rows(self, platform: str) -> torch.Tensor:
        """Rows of one platform's items (the candidate set for that platform)."""
        if platform not in self._platform_rows:
            raise KeyError(f"unknown platform {platform!r}; known: {sorted(self._platform_rows)}")
        return self._platform_rows[platform]


@torch.inference_mode()
def encode_texts(
    texts: list[str], base_model: str | None, max_tokens: int, batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """Mean-pooled, unit-norm embeddings of ``texts`` by the frozen base encoder."""
    tok = load_tokenizer(base_model)
    tok.truncation_side = "right"
    enc = load_encoder(base_model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), enc.config.hidden_size)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="embedding catalogue", unit="batch", disable=not progress):
        idx = order[s : s + batch_size]
        batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        hidden = enc(**batch).last_hidden_state
        out[idx] = F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
    return out


@dataclass
class ItemTokens:
    """The catalogue's item texts tokenised once (``[N, L]`` ids and mask, ItemIndex row order):
    the input of the adapted item tower, which re-encodes items with the LoRA encoder."""

    ids: torch.Tensor
    mask: torch.Tensor

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of ``rows`` (any shape), trimmed to their longest item."""
        mask = self.mask[rows]
        width = max(int(mask.sum(-1).max()) if mask.numel() else 1, 1)
        return self.ids[rows][..., :width], mask[..., :width]


def tokenize_items(catalogue: Catalogue, item_ids: list[str], base_model: str | None, max_tokens: int) -> ItemTokens:
    """Tokenise every item's catalogue text as :func:`encode_texts` does (right-truncated)."""
    tok = load_tokenizer(base_model)
    tok.truncation_side = "right"
    texts = [event_text(catalogue.items[i], DEFAULT_EVENT_TYPE) for i in item_ids]
    batch = tok(texts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    return ItemTokens(batch["input_ids"], batch["attention_mask"])


@torch.inference_mode()
def embed_items(
    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokens: ItemTokens,
    rows: torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """``[len(rows), H]`` unit item vectors by ``embed`` (e.g. :meth:`InterestModel.embed`,
    the adapted tower), batched shortest-first; returned on the CPU in ``rows`` order."""
    lengths = tokens.mask[rows].sum(-1)
    order = torch.argsort(lengths).tolist()
    out: torch.Tensor | None = None
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="embedding catalogue (adapted tower)", unit="batch", disable=not progress):
        idx = order[s : s + batch_size]
        ids, mask = tokens.take(rows[idx])
        vec = embed(ids.to(device), mask.to(device)).float().cpu()
        if out is None:
            out = torch.empty(len(rows), vec.shape[-1])
        out[idx] = vec
    return out if out is not None else torch.zeros(0, 0)


def embeddings_sha256(emb: torch.Tensor) -> str:
    """sha256 of an index's embedding bytes (stored beside them, checked on load)."""
    return hashlib.sha256(emb.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def index_problem(saved: object, ids: list[str], hidden: int | None = None) -> str | None:
    """Why a loaded item index cannot be used (one line), or ``None``: not an index, other
    item ids, wrong shape or dtype, content hash mismatch (byte corruption), non-finite or
    non-unit rows (every tower's rows are unit vectors)."""
    if not isinstance(saved, dict) or "ids" not in saved or not isinstance(saved.get("emb"), torch.Tensor):
        return "not an item index (expected ids and an emb tensor)"
    emb = saved["emb"]
    if list(saved["ids"]) != ids:
        return "its item ids differ from the catalogue's"
    if emb.dtype != torch.float32 or emb.ndim != 2 or emb.shape[0] != len(ids) or (hidden and emb.shape[1] != hidden):
        want = f"[{len(ids)}, {hidden or 'H'}] float32"
        return f"its embeddings are {list(emb.shape)} {str(emb.dtype).replace('torch.', '')}, expected {want}"
    if "sha256" in saved and saved["sha256"] != embeddings_sha256(emb):
        return "its embeddings do not match their stored sha256 (corrupted)"
    if not torch.isfinite(emb).all():
        return f"{int((~torch.isfinite(emb)).any(1).sum())} item row(s) are not finite"
    if len(ids) and not torch.allclose(emb.norm(dim=1), torch.ones(len(ids)), atol=1e-3):
        return "its rows are not unit vectors (corrupted)"
    return None


def build_item_index(
    catalogue: Catalogue, base_model: str | None, max_tokens: int, progress: bool = False
) -> ItemIndex:
    """Load the cached item index, or compute and cache it (once, under a lock)."""
    ids = list(catalogue.items)
    platforms = [catalogue.items[i].platform for i in ids]
    key = f"items-{model_hash(base_model)[:16]}-{catalogue_hash(catalogue)[:16]}-{max_tokens}.pt"
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / key
    with open(folder / (key + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                why = index_problem(saved, ids)
            except Exception as e:  # a truncated or corrupted file; rebuilt below
                why = f"unreadable ({type(e).__name__}: {e})"
            if why is None:
                return ItemIndex(ids, saved["emb"], platforms)
            print(f"{path}: {why}; rebuilding it", file=sys.stderr, flush=True)
        texts = [event_text(catalogue.items[i], DEFAULT_EVENT_TYPE) for i in ids]
        emb = encode_texts(texts, base_model, max_tokens, progress=progress)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".items-", suffix=".tmp")
        os.close(fd)
        torch.save({"ids": ids, "emb": emb, "sha256": embeddings_sha256(emb)}, tmp)
        os.replace(tmp, path)
    return ItemIndex(ids, emb, platforms)
