"""Centralised, non-private LoRA training: every silo's training users pooled in one place.

The upper reference of the experiment grid (``fedshift experiment``): the same model,
loss (:func:`fl_client.dp_train.interest_loss`), examples (:class:`fl_client.task.TrainUsers`:
one fresh random history cut per user and access), negatives and optimiser as a silo's
local training, but without DP-SGD and without federation.

* **Pooling.** Each batch comes from one silo (so its negatives and the next-interest
  category mask are that silo's platform's, as :func:`interest_loss` expects); the silo
  of each step is drawn with probability proportional to its number of training users,
  so over the run every training user is equally likely to be seen, as in one pooled
  shuffle. Within a silo, batches are plain shuffled passes over its users.
* **Popularity prior.** With ``popularity-prior`` the model scores with the exact prior of
  the pooled training users (the federated run's prior is the sum of the silos' noisy releases).
* **Budget.** ``num-server-rounds × local-steps × #silos`` optimiser steps of
  ``batch-size`` examples: the same number of gradient steps (and examples) as all silos
  together take in a federated run of the same config. One AdamW optimiser for the whole
  run (a federated silo starts a fresh one every round).
* **Output.** ``checkpoints/round-NNN/`` (NNN = ``num-server-rounds``) written by
  :func:`shared_model.adapters.save_checkpoint` with the server's metadata format, so
  ``fedshift evaluate`` and the experiment harness read it like a federated checkpoint;
  ``metrics.json`` with the mean training loss per block of ``local-steps × #silos`` steps.
"""

from __future__ import annotations

import json
import math
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fl_client.dp_train import adapted_interest_loss, interest_loss, parameter_groups
from fl_client.task import TrainUsers, open_silo
from shared_model.adapters import save_checkpoint
from shared_model.batches import collate
from shared_model.config import RunConfig
from shared_model.dataset import list_silos
from shared_model.encoder import model_hash, resolve_base_model
from shared_model.item_index import catalogue_hash
from shared_model.io_utils import write_bytes_atomic
from shared_model.examples import train_user_ids
from shared_model.model import build_model
from shared_model.popularity import item_counts, log_prior, prior_vector


def exact_prior(datas: list[Any], cfg: RunConfig) -> Any:
    """The popularity prior of every silo's training users, counted exactly (no noise: this
    trainer is the non-private reference), by the federated prior's own functions: one count per
    silo over its platforms' items (a region silo's, as its release), summed per platform."""
    catalogue = datas[0].catalogue
    sums: dict[str, Any] = {}
    for d in datas:
        per = {p: catalogue.platform_item_ids(p) for p in d.platforms}
        counts = item_counts(d.silo, train_user_ids(d.silo), [i for p in d.platforms for i in per[p]],
                             cfg.popularity_max_items)
        start = 0
        for p in d.platforms:
            sums[p] = sums.get(p, 0) + counts[start:start + len(per[p])]
            start += len(per[p])
    return prior_vector(catalogue, {p: log_prior(c, 0.0, cfg.popularity_threshold) for p, c in sums.items()})


def train_centralised(cfg: RunConfig, out: Path, progress: Any = None) -> Path:
    """Train on all silos of ``cfg.dataset`` pooled, without DP; return the checkpoint folder."""
    cfg = cfg.replace(dp=False)
    out = Path(out)
    dataset = cfg.dataset_dir()
    silos = list_silos(dataset)
    if not silos:
        raise ValueError(f"{dataset}/silos: no silo folders")
    torch.manual_seed(cfg.seed)
    datas = [open_silo(cfg, {"silo-dir": str(dataset / "silos" / s)}) for s in silos]
    categories = datas[0].categories
    model = build_model(cfg, num_categories=len(categories))
    if model.popularity_prior is not None:  # the exact (non-private) prior of the pooled training users
        model.popularity_prior.set_prior(exact_prior(datas, cfg))
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.learning_rate)

    loaders = []
    for i, data in enumerate(datas):
        users = TrainUsers(data, cfg, seed=cfg.seed + 1000 + i)
        if len(users) == 0:
            raise ValueError(f"silo {data.name}: no training users")
        pad = users.encode.tokenizer.pad_token_id or 0
        gen = torch.Generator().manual_seed(cfg.seed + i)
        loaders.append(DataLoader(users, batch_size=min(cfg.batch_size, len(users)), shuffle=True, generator=gen,
                                  collate_fn=lambda b, pad=pad: collate(b, pad, len(categories))))
    iters = [iter(dl) for dl in loaders]
    weights = [len(dl.dataset) for dl in loaders]  # type: ignore[arg-type]
    pick_rng = random.Random(cfg.seed)
    neg_gen = torch.Generator().manual_seed(cfg.seed + 1)
    item_emb = datas[0].items.embeddings
    prior = datas[0].item_prior_index
    platform_rows = [d.platform_rows() for d in datas]  # the text tower trains platform silos only (open_silo)

    block = cfg.local_steps * len(silos)
    total = cfg.num_server_rounds * block
    losses: list[float] = []
    blocks: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for step in range(total):
        s = pick_rng.choices(range(len(datas)), weights=weights)[0]
        try:
            batch = next(iters[s])
        except StopIteration:
            iters[s] = iter(loaders[s])
            batch = next(iters[s])
        data = datas[s]
        rows = platform_rows[s]
        optimizer.zero_grad(set_to_none=True)
        if cfg.item_tower == "adapted":
            negatives = rows[torch.randint(len(rows), (len(batch[2]), cfg.tower_negatives), generator=neg_gen)]
            loss = adapted_interest_loss(model, batch, data.item_tokens, prior, data.category_mask, negatives, cfg)
        else:
            negatives = rows[torch.randint(len(rows), (cfg.num_negatives,), generator=neg_gen)]
            loss = interest_loss(model, batch, item_emb, prior, data.category_mask, negatives, cfg)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % block == 0:
            blocks.append({"round": (step + 1) // block, "train-loss": sum(losses[-block:]) / block,
                           "steps": step + 1, "seconds": round(time.perf_counter() - t0, 1)})
            if progress:
                progress(f"centralised: block {(step + 1) // block}/{cfg.num_server_rounds}, "
                         f"loss {blocks[-1]['train-loss']:.3f}")
    model.eval()
    base = resolve_base_model(cfg.base_model)
    catalogue = datas[0].catalogue
    meta = {
        "round": cfg.num_server_rounds,
        "base-model": str(base),
        "base-model-sha256": model_hash(cfg.base_model),
        "catalogue-sha256": catalogue_hash(catalogue),
        "categories": categories,
        "config": cfg.to_run_config(),
        "run-id": "centralised",
    }
    folder = save_checkpoint(model, out / "checkpoints" / f"round-{cfg.num_server_rounds:03d}", meta)
    doc = {
        "run": {"kind": "centralised", "dp": False, "silos": silos, "steps": total,
                "train-users": sum(weights), "seconds": round(time.perf_counter() - t0, 1),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg.to_run_config()},
        "blocks": blocks,
        "final-loss": blocks[-1]["train-loss"] if blocks else math.nan,
    }
    write_bytes_atomic(out / "metrics.json", json.dumps(doc, indent=2).encode())
    return folder
