"""Adapter + head state in and out: the only tensors a silo ever sends.

``get_trainable_state`` / ``set_trainable_state`` are the two functions through which
state crosses the silo boundary; ``to_arrays`` / ``from_arrays`` wrap them in Flower's
``ArrayRecord``. ``save_checkpoint`` writes a peft-loadable adapter folder plus heads and
metadata; ``load_checkpoint`` reads it back into an :class:`InterestModel`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file

from shared_model.checkpoint_signature import sign_checkpoint
from shared_model.config import RunConfig
from shared_model.model import InterestModel, build_model

HEADS_FILE = "heads.safetensors"
#: The non-LoRA modules saved in the heads file (popularity_prior holds the run's prior, a buffer:
#: saved with the checkpoint, never exchanged).
HEAD_MODULES = ("category_head", "history_head", "popularity_head", "popularity_prior", "last_item_head")
META_FILE = "fedshift.json"


def get_trainable_state(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Exactly the trainable tensors (LoRA A/B and heads), detached, on CPU, by name."""
    return OrderedDict(
        (name, p.detach().cpu().clone()) for name, p in _unwrap(model).named_parameters() if p.requires_grad
    )


def set_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load trainable tensors by name; names and shapes must match exactly."""
    params = {n: p for n, p in _unwrap(model).named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:3]
        unexpected = sorted(set(state) - set(params))[:3]
        raise KeyError(f"trainable state mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in params.items():
            value = torch.as_tensor(state[name])
            if value.shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(p.shape)}")
            p.copy_(value.to(p.dtype))


def to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The model's trainable state as a Flower ArrayRecord."""
    return ArrayRecord(get_trainable_state(model))


def arrays_sha256(arrays: ArrayRecord) -> str:
    """SHA-256 of an ArrayRecord's names and serialised bytes, in order: the ``model-sha256``
    a silo's ledger record names and the ``update-sha256`` the server records of each reply."""
    h = hashlib.sha256()
    for key in arrays.keys():
        h.update(key.encode())
        h.update(arrays[key].data)
    return h.hexdigest()


def from_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Load a Flower ArrayRecord (from :func:`to_arrays`) into the model."""
    set_trainable_state(model, arrays.to_torch_state_dict())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The InterestModel under an Opacus GradSampleModule, if wrapped."""
    return getattr(model, "_module", model)


def save_checkpoint(
    model: InterestModel, folder: str | os.PathLike[str], metadata: dict[str, Any],
    signing_key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write ``folder`` atomically: peft adapter files, heads, and metadata JSON; with
    ``signing_key``, also the signed manifest of them all (:mod:`shared_model.checkpoint_signature`).

    ``PeftModel.from_pretrained(base, folder)`` loads the adapter alone.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model = _unwrap(model)  # type: ignore[assignment]
        if hasattr(model, "encoder"):  # the text tower: a peft adapter folder plus its heads
            model.encoder.save_pretrained(str(tmp))
            heads = {
                f"{name}.{k}": v.detach().cpu().contiguous()
                for name in HEAD_MODULES
                if getattr(model, name) is not None
                for k, v in getattr(model, name).state_dict().items()
            }
        else:  # the sequence model: every parameter and saved buffer (prior, transition counts)
            heads = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(heads, str(tmp / HEADS_FILE))
        (tmp / META_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        if signing_key is not None:
            sign_checkpoint(tmp, signing_key)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a fedshift checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def checkpoint_config(meta: dict[str, Any], base_model: str | None = None) -> RunConfig:
    """The run config a checkpoint was trained with (``base_model`` overrides its encoder).

    A checkpoint written before ``history-features`` (``popularity-prior``, ``user-tower``,
    ``transitions``) existed has no such key and no θ (no popularity head; the text tower; no
    transition counts)."""
    saved = {"history-features": False, "popularity-prior": False, "last-item-score": False, "user-tower": "text",
             "transitions": False, **meta["config"]}
    return RunConfig.from_run_config(saved if not base_model else {**saved, "base-model": base_model})


def load_checkpoint(folder: str | os.PathLike[str], base_model: str | None = None) -> tuple[InterestModel, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint` (eval mode)."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    meta = read_metadata(folder)
    cfg = checkpoint_config(meta, base_model)
    model = build_model(cfg, num_categories=len(meta["categories"]))
    if cfg.user_tower == "sequence":
        try:
            model.load_state_dict(load_file(str(folder / HEADS_FILE)))
        except RuntimeError as e:  # missing or unexpected tensors, wrong shapes
            raise ValueError(f"{folder / HEADS_FILE}: does not match config.{'user-tower'} = sequence: "
                             f"{str(e).splitlines()[0][:300]}") from None
        return model.eval(), meta
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    set_peft_model_state_dict(model.encoder, adapter)
    heads = load_file(str(folder / HEADS_FILE))
    for name in HEAD_MODULES:
        module = getattr(model, name)
        saved = {k.split(".", 1)[1]: v for k, v in heads.items() if k.startswith(name + ".")}
        switch = {"popularity_head": "popularity-prior", "popularity_prior": "popularity-prior",
                  "last_item_head": "last-item-score"}.get(name, "history-features")
        if module is None and saved:
            raise ValueError(f"{folder / HEADS_FILE}: has {name} but config.{switch} is off")
        if module is not None:
            if not saved:
                raise ValueError(f"{folder / HEADS_FILE}: missing {name} (config.{switch} is on)")
            if "log_prior" in saved:  # the buffer's length is the catalogue's, set by the server
                module.set_prior(saved["log_prior"])
            module.load_state_dict(saved)
    return model.eval(), meta
