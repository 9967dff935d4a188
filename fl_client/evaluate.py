"""Federated evaluation on a silo's validation users.

Next item, frozen item tower: full ranking over the silo platform's whole catalogue (the
item tower is precomputed, so it is cheap). Adapted item tower: the catalogue would have to
be re-encoded by the round's LoRA encoder on every silo every round (≈19k items, minutes on
a CPU), so the target is ranked among ``eval-candidates`` platform items drawn once with the
run's seed (the same set for every user, round and silo of a platform), and the
``eval-candidates`` metric says how many items were ranked. Sampled metrics are higher than
full-ranking ones and are not comparable to them; ``fedshift evaluate`` always ranks the
full catalogue. In both cases the user's history items are excluded from the candidates
(the target itself never is). Next interest: top-1 accuracy of the level-2 category, for
all users and the migrating subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fl_client.task import IGNORE_INDEX, Encoder, SiloData, collate, evaluation_examples
from shared_model.config import RunConfig
from shared_model.metrics import accuracy, hit_rate, mrr, ndcg, rank_of_target
from shared_model.item_index import embed_items
from shared_model.model import InterestModel, item_scores, mask_to_platform, own_item_scores


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


@torch.inference_mode()
def evaluate_silo(
    model: InterestModel, data: SiloData, cfg: RunConfig, device: torch.device, split: str = "valid"
) -> EvalResult:
    examples = evaluation_examples(data, cfg, split)
    encode = Encoder(data, cfg)
    pad_id = encode.tokenizer.pad_token_id or 0
    model.to(device).eval()
    rows = data.items.platform_rows(data.platform)
    adapted = cfg.item_tower == "adapted"
    sampled = adapted and 0 < cfg.eval_candidates < len(rows)
    if sampled:
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.eval_candidates]
        rows = rows[pick.sort().values]
    if adapted:
        cand = embed_items(model.embed, data.item_tokens, rows, device, cfg.eval_batch_size).to(device)
    else:
        cand = data.items.embeddings[rows].to(device)
    cand_prior = data.item_prior_index[rows].to(device)
    category_mask = data.category_mask.to(device)
    col = {int(r): c for c, r in enumerate(rows.tolist())}
    ranks: list[int] = []
    pred_cat: list[int] = []
    true_cat: list[int] = []
    migrating: list[bool] = []
    for s in range(0, len(examples), cfg.eval_batch_size):
        chunk = examples[s : s + cfg.eval_batch_size]
        input_ids, mask, target_rows, cats, feats = collate([encode(ex) for ex in chunk], pad_id)
        user, cat_logits = model(input_ids.to(device), mask.to(device), feats.to(device))
        cat_logits = mask_to_platform(cat_logits, category_mask)
        scores = item_scores(user, cat_logits, cand, cand_prior, cfg.logit_scale, cfg.category_prior_weight).cpu()
        if adapted:  # column 0: each user's own target, encoded by the same adapted tower
            target_emb = embed_items(model.embed, data.item_tokens, target_rows, device).to(device)
            own = own_item_scores(user, cat_logits, target_emb, data.item_prior_index[target_rows].to(device),
                                  cfg.logit_scale, cfg.category_prior_weight).cpu()
            scores = torch.cat([own.unsqueeze(1), scores], dim=1)
            shifted = {int(r): c + 1 for c, r in enumerate(rows.tolist())}
            for i, r in enumerate(target_rows.tolist()):
                if r in shifted:  # the target drawn as a candidate too: rank it once
                    scores[i, shifted[r]] = float("-inf")
            lookup, target_cols = shifted, torch.zeros(len(chunk), dtype=torch.long)
        else:
            lookup, target_cols = col, torch.tensor([col[int(r)] for r in target_rows])
        for i, ex in enumerate(chunk):
            target = int(target_rows[i])
            history = {data.items.row.get(e.item_id) for e in ex.history}
            seen = [lookup[r] for r in history if r in lookup and r != target]
            if seen:
                scores[i, seen] = float("-inf")
        ranks.extend(rank_of_target(scores, target_cols).tolist())
        pred_cat.extend(cat_logits.argmax(-1).cpu().tolist())
        true_cat.extend(cats.tolist())
        migrating.extend(ex.migrating for ex in chunk)
    mig_pred = [p for p, m in zip(pred_cat, migrating) if m]
    mig_true = [t for t, m in zip(true_cat, migrating) if m]
    return EvalResult(
        users=len(examples),
        category_accuracy=accuracy(pred_cat, true_cat),
        category_accuracy_migrating=accuracy(mig_pred, mig_true),
        hr10=hit_rate(ranks, 10),
        ndcg10=ndcg(ranks, 10),
        mrr=mrr(ranks),
        candidates=len(rows) + (1 if sampled else 0),
        migrating_users=sum(1 for m, t in zip(migrating, true_cat) if m and t != IGNORE_INDEX),
    )
