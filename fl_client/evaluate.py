"""Federated evaluation on a silo's validation users.

Next item, frozen item tower: full ranking over the target platform's whole catalogue (the
item tower is precomputed, so it is cheap). Adapted item tower: the catalogue would have to
be re-encoded by the round's LoRA encoder on every silo every round (its cost:
docs/item-tower.md), so the target is ranked among ``eval-candidates`` platform items drawn once with the
run's seed (the same set for every user, round and silo of a platform), and the
``eval-candidates`` metric says how many items were ranked. Sampled metrics are higher than
full-ranking ones and are not comparable to them; ``fedshift evaluate`` always ranks the
full catalogue. In both cases the user's history items are excluded from the candidates
(the target itself never is). Next interest: top-1 accuracy of the interest class, for
all users and the migrating subset.

Scoring, exclusion and ranking are :mod:`shared_model.scoring`'s; each figure is the mean
of a per-user vector of :mod:`shared_model.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fl_client.task import SiloData, evaluation_examples
from shared_model.batches import IGNORE_INDEX
from shared_model.config import RunConfig
from shared_model.metrics import hits, mean, ndcgs, reciprocal_ranks, topk_correct
from shared_model.model import InterestModel
from shared_model.scoring import ItemTower, candidates, rank_examples


@dataclass
class EvalResult:
    users: int
    category_accuracy: float
    category_accuracy_migrating: float
    hr10: float
    ndcg10: float
    mrr: float
    migrating_users: int
    candidates: int = 0  # items each target is ranked among (itself included)
    #: per-user vectors (correct, hits, ndcgs, rrs, migrating): what a dp release sums; never sent
    per_user: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def as_metrics(self) -> dict[str, float]:
        return {
            "eval-users": float(self.users),
            "migrating-users": float(self.migrating_users),
            "category-accuracy": _finite(self.category_accuracy),
            "category-accuracy-migrating": _finite(self.category_accuracy_migrating),
            "hr10": _finite(self.hr10),
            "ndcg10": _finite(self.ndcg10),
            "mrr": _finite(self.mrr),
            "eval-candidates": float(self.candidates),
        }


def _finite(x: float) -> float:
    return -1.0 if math.isnan(x) else float(x)


def item_tower(model: InterestModel, data: SiloData, cfg: RunConfig) -> ItemTower:
    """The silo's item tower: the frozen index rows, or the model's adapted encoder."""
    if cfg.item_tower == "adapted":
        return ItemTower(data.item_prior_index, embed=model.embed, tokens=data.item_tokens)
    return ItemTower(data.item_prior_index, embeddings=data.items.embeddings)


@torch.inference_mode()
def evaluate_silo(
    model: InterestModel, data: SiloData, cfg: RunConfig, device: torch.device, split: str = "valid"
) -> EvalResult:
    examples = evaluation_examples(data, cfg, split)
    model.to(device).eval()
    if cfg.user_tower == "sequence":
        ranked, size = _rank_sequence(model, data, cfg, examples, device)
        return _result(examples, ranked, size)
    sample = cfg.eval_candidates if cfg.item_tower == "adapted" else 0
    cands = candidates(item_tower(model, data, cfg), data.items.platform_rows(data.platform), device,
                       cfg.eval_batch_size, sample=sample, seed=cfg.seed)
    ranked = rank_examples(model, data.batcher(cfg), examples, cands, data.category_mask, cfg, device,
                          what=f"silo {data.name}: model scores")
    return _result(examples, ranked, cands.size)


def _rank_sequence(model: InterestModel, data: SiloData, cfg: RunConfig, examples: list, device: torch.device):  # type: ignore[no-untyped-def]
    """The sequence model's ranking of each example over its target platform's whole catalogue
    (item vectors are cached); a region silo's examples ranked platform by platform, in order."""
    from shared_model.scoring import Ranked
    from shared_model.sequence_scoring import platform_candidates, rank_sequence_examples

    items = data.catalogue.items
    parts, order, sizes = [], [], []
    for platform in data.platforms:
        mine = [i for i, ex in enumerate(examples) if items[ex.target.item_id].platform == platform]
        if not mine and len(data.platforms) > 1:
            continue
        rows = data.items.platform_rows(platform)
        cands = platform_candidates(model, data.items.embeddings, data.item_prior_index, rows, device)  # type: ignore[arg-type]
        parts.append(rank_sequence_examples(model, data.sequence_batcher(cfg), [examples[i] for i in mine], cands,  # type: ignore[arg-type]
                                            data.platform_mask(platform), cfg.category_prior_weight, device,
                                            cfg.eval_batch_size, what=f"silo {data.name}: model scores",
                                            target_platform=data.catalogue.platforms.index(platform)))
        order.extend(mine)
        sizes.append(len(rows))
    if len(parts) == 1:
        return parts[0], sizes[0]
    back = np.argsort(np.asarray(order, dtype=np.int64), kind="stable")
    ranked = Ranked(np.concatenate([p.ranks for p in parts])[back], torch.cat([p.category_logits for p in parts])[back],
                    torch.cat([p.categories for p in parts])[back], np.concatenate([p.tied for p in parts])[back])
    return ranked, int(round(float(np.mean(sizes))))


def _result(examples: list, ranked, candidates: int) -> EvalResult:  # type: ignore[no-untyped-def]
    truth = ranked.categories.numpy()
    correct = topk_correct(ranked.category_logits.numpy(), truth, 1)
    migrating = np.array([ex.migrating for ex in examples], dtype=bool)
    hit = hits(ranked.ranks, 10, ranked.tied)
    ndcg = ndcgs(ranked.ranks, 10, ranked.tied)
    rr = reciprocal_ranks(ranked.ranks, ranked.tied)
    return EvalResult(
        users=len(examples),
        category_accuracy=mean(correct),
        category_accuracy_migrating=mean(correct[migrating]),
        hr10=mean(hit),
        ndcg10=mean(ndcg),
        mrr=mean(rr),
        candidates=candidates,
        migrating_users=int((migrating & (truth != IGNORE_INDEX)).sum()),
        per_user={"correct": correct, "hits": np.asarray(hit), "ndcgs": np.asarray(ndcg), "rrs": np.asarray(rr),
                  "migrating": migrating},
    )
