"""The converged ceiling: the sequence model trained centrally, without privacy, to convergence.

The upper reference of the experiment grid for ``user-tower = sequence`` (issue #23, item 1). It
bounds what the architecture can do when privacy and federation cost nothing:

* **Data.** Every silo's training users pooled; each batch comes from one silo (its platform's
  candidates and category mask; a region silo's per platform, each position scored on its
  target's platform, as :func:`fl_client.sequence_train.shared_candidates` and
  :meth:`fl_client.task.SiloData.item_space`), silos interleaved at random in proportion to
  their batches.
  One example is one user's whole window with a loss at every position
  (:func:`shared_model.sequence_loss.sequence_loss`).
* **Statistics.** The exact popularity prior of the pooled training users and their exact item
  transitions: every consecutive pair of every user (no contribution bound, no candidate set, no
  noise, no threshold), scored leave-one-out like the private model.
* **Convergence.** Epochs over every training user until validation NDCG@10 has not improved
  for ``patience`` epochs (at most ``max-epochs``), for each learning rate of a small grid; the
  best epoch of the best rate is kept. Validation users only choose; test users are never read.
* **Output.** ``checkpoints/round-NNN/`` (NNN = the config's ``num-server-rounds``, so the
  experiment reads it like a federated run's last checkpoint) and ``metrics.json`` with every
  epoch's loss and validation NDCG@10 per learning rate, the chosen rate and epoch, and the
  wall time.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fl_client.evaluate import evaluate_silo
from fl_client.sequence_train import optimizer_groups, shared_candidates, training_set
from fl_client.task import SiloData, open_silo
from shared_model.adapters import get_trainable_state, save_checkpoint, set_trainable_state
from shared_model.config import RunConfig
from shared_model.dataset import list_silos
from shared_model.encoder import model_hash, resolve_base_model
from shared_model.examples import train_user_ids
from shared_model.io_utils import write_bytes_atomic
from shared_model.item_index import catalogue_hash
from shared_model.model import build_model
from shared_model.sequence_loss import sequence_loss
from shared_model.sequences import PhysicalBatches, collate_sequences, unpack
from shared_model.transitions import TransitionTable, pair_counts, sum_releases
from simulations.experiment.centralised import exact_prior

#: ``head-learning-rate`` values tried (the few-number weights; matrices keep ``learning-rate``).
LEARNING_RATES = (0.01, 0.03, 0.1)


@dataclass
class CeilingBudget:
    max_epochs: int = 8
    patience: int = 2
    learning_rates: tuple[float, ...] = LEARNING_RATES


def exact_transitions(datas: list[SiloData], max_pairs: int) -> TransitionTable:
    """Every pooled training user's consecutive pairs (at most ``max_pairs`` each), counted exactly."""
    num_items = len(datas[0].items.item_ids)
    releases = [(*pair_counts(d.silo, train_user_ids(d.silo), d.items.row, max_pairs), 0.0) for d in datas]
    table, _, _ = sum_releases(releases, 0.0, num_items)
    return table


def validation_ndcg(model: torch.nn.Module, datas: list[SiloData], cfg: RunConfig) -> tuple[float, float]:
    """(NDCG@10, next-category accuracy@1) over every silo's validation users (full ranking)."""
    results = [evaluate_silo(model, d, cfg, torch.device("cpu"), split="valid") for d in datas]  # type: ignore[arg-type]
    users = sum(r.users for r in results)
    ndcg = sum(r.ndcg10 * r.users for r in results) / max(users, 1)
    cat = sum(r.category_accuracy * r.users for r in results if not math.isnan(r.category_accuracy)) / max(users, 1)
    return ndcg, cat


def _epoch(model: torch.nn.Module, datas: list[SiloData], cfg: RunConfig, optimizer: torch.optim.Optimizer,
           rng: random.Random, seed: int) -> float:
    """One pass over every training user; returns the mean loss."""
    loaders = []
    for i, d in enumerate(datas):
        dataset = training_set(d, cfg)
        shuffled = DataLoader(dataset, batch_size=min(cfg.batch_size, len(dataset)), shuffle=True,
                              generator=torch.Generator().manual_seed(seed * 1000 + i))
        sampler = PhysicalBatches(shuffled.batch_sampler, dataset.window_length, cfg.physical_batch_size)
        loaders.append((d, DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_sequences(dataset.batcher)),
                        sampler))
    iters = [(d, iter(dl), sampler) for d, dl, sampler in loaders]
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    while iters:
        d, it, sampler = iters[rng.randrange(len(iters))]
        items = d.item_space(torch.device("cpu"))
        shared = shared_candidates(d, cfg, gen)  # per platform: a region silo samples each of its platforms
        try:
            while True:  # one logical batch: its physical parts, then a step
                batch = next(it)
                inp, pairs = unpack(batch)  # type: ignore[misc]
                loss, _ = sequence_loss(model, inp, pairs, items, shared, cfg.item_loss_weight, cfg.category_loss_weight,
                                        cfg.category_prior_weight, cfg.loss_top_k)
                (loss * inp.rows.shape[0] / sampler.logical_size).backward()
                losses.append(float(loss.detach()))
                if sampler.last_part:
                    break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        except StopIteration:
            iters = [x for x in iters if x[1] is not it]
    return sum(losses) / max(len(losses), 1)


def train_ceiling(cfg: RunConfig, out: Path, progress: Any = None, budget: CeilingBudget | None = None) -> Path:
    """Train to convergence on every silo of ``cfg.dataset`` pooled, without DP (see the module
    docstring); return the checkpoint folder."""
    budget = budget or CeilingBudget()
    cfg = cfg.replace(dp=False, **{"max-eval-users": 0})
    if cfg.user_tower != "sequence":
        raise ValueError("the converged ceiling trains the sequence model (user-tower = sequence)")
    out = Path(out)
    dataset = cfg.dataset_dir()
    silos = list_silos(dataset)
    datas = [open_silo(cfg, {"silo-dir": str(dataset / "silos" / s)}) for s in silos]
    categories = datas[0].categories
    prior = exact_prior(datas, cfg) if cfg.popularity_prior else None
    table = exact_transitions(datas, cfg.max_history + 1) if cfg.transitions else None
    # the leave-one-out pairs of each user are all of their pairs (no contribution bound here)
    cfg_train = cfg.replace(**{"transition-max-pairs": cfg.max_history + 1})

    def fresh() -> torch.nn.Module:
        model = build_model(cfg, num_categories=len(categories))
        if prior is not None:
            model.popularity_prior.set_prior(prior)  # type: ignore[union-attr]
        if table is not None:
            model.transition_table.set_table(table)  # type: ignore[union-attr]
        return model

    t0 = time.perf_counter()
    untrained = fresh()
    base_ndcg, base_cat = validation_ndcg(untrained, datas, cfg)
    say = progress or (lambda _msg: None)
    say(f"ceiling: untrained model, valid NDCG@10 {base_ndcg:.4f}")
    searches: list[dict[str, Any]] = []
    best: tuple[float, float, int, dict[str, torch.Tensor]] | None = None
    for lr in budget.learning_rates:
        model = fresh()
        optimizer = torch.optim.Adam(optimizer_groups(model, cfg_train.replace(**{"head-learning-rate": lr})))
        rng = random.Random(cfg.seed)
        curve: list[dict[str, float]] = []
        top, top_epoch, waited = -1.0, 0, 0
        for epoch in range(1, budget.max_epochs + 1):
            model.train()
            loss = _epoch(model, datas, cfg_train, optimizer, rng, cfg.seed + epoch)
            ndcg, cat = validation_ndcg(model, datas, cfg)
            curve.append({"epoch": epoch, "train-loss": loss, "valid-ndcg10": ndcg, "valid-category-acc1": cat,
                          "seconds": round(time.perf_counter() - t0, 1)})
            say(f"ceiling: lr {lr:g} epoch {epoch}: loss {loss:.3f}, valid NDCG@10 {ndcg:.4f}")
            if ndcg > top:
                top, top_epoch, waited = ndcg, epoch, 0
                if best is None or ndcg > best[0]:
                    best = (ndcg, lr, epoch, get_trainable_state(model))
            else:
                waited += 1
                if waited >= budget.patience:
                    break
        searches.append({"learning-rate": lr, "best-epoch": top_epoch, "best-valid-ndcg10": top, "epochs": curve})
    assert best is not None
    model = fresh()
    set_trainable_state(model, best[3])
    model.eval()
    base = resolve_base_model(cfg.base_model)
    meta = {"round": cfg.num_server_rounds, "base-model": str(base), "base-model-sha256": model_hash(cfg.base_model),
            "catalogue-sha256": catalogue_hash(datas[0].catalogue), "categories": categories,
            "interests": datas[0].catalogue.interest_choice, "config": cfg.to_run_config(), "run-id": "ceiling"}
    folder = save_checkpoint(model, out / "checkpoints" / f"round-{cfg.num_server_rounds:03d}", meta)
    seconds = round(time.perf_counter() - t0, 1)
    doc = {"run": {"kind": "ceiling", "dp": False, "silos": silos, "train-users": sum(len(train_user_ids(d.silo)) for d in datas),
                   "untrained-valid-ndcg10": base_ndcg, "untrained-valid-category-acc1": base_cat,
                   "chosen-learning-rate": best[1], "chosen-epoch": best[2], "best-valid-ndcg10": best[0],
                   "epochs-trained": sum(len(s["epochs"]) for s in searches), "seconds": seconds,
                   "transition-pairs": len(table) if table is not None else 0,
                   "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg.to_run_config()},
           "searches": searches}
    write_bytes_atomic(out / "metrics.json", json.dumps(doc, indent=2, default=float).encode())
    say(f"ceiling: chose lr {best[1]:g}, epoch {best[2]}: valid NDCG@10 {best[0]:.4f} "
        f"(untrained {base_ndcg:.4f}); {seconds:.0f} s")
    return folder


def main() -> None:  # python -m simulations.experiment.ceiling [KEY=VALUE ...] OUT
    import sys

    args = sys.argv[1:]
    out = Path(args[-1])
    overrides = dict(a.split("=", 1) for a in args[:-1])
    budget = CeilingBudget()
    if "ceiling-lrs" in overrides:
        budget.learning_rates = tuple(float(x) for x in overrides.pop("ceiling-lrs").split(","))
    if "ceiling-epochs" in overrides:
        budget.max_epochs = int(overrides.pop("ceiling-epochs"))
    np.random.seed(0)
    train_ceiling(RunConfig().replace(**overrides), out, progress=lambda m: print(m, flush=True), budget=budget)


if __name__ == "__main__":
    main()
