"""The interest-migration model: a LoRA-adapted BERT user tower with two heads.

* user tower: peft LoRA on the base encoder, mean pooling → user vector ``h`` (dim H);
* next-interest head: ``Linear(H, C)`` over the interest classes of the public catalogue,
  plus (``history-features``) :class:`HistoryFeatureHead`, a conditional logit over
  per-category features of the user's own history;
* next-item head: ``score(u, i) = s·cos(h, e_i) + w·log p(category(i) | u) + v·log prior(i) + b·s·cos(e_last, e_i)`` —
  scaled cosine against the item tower plus the next-interest head's log-probability of the
  item's category, so the interest-migration prediction steers which items are recommended,
  plus (``popularity-prior``) the DP popularity prior of the item's platform with a trained
  weight v, plus (``last-item-score``) ``b·s·cos(e_last, e_i)``, the content similarity of the
  item to the user's newest history item in the same item tower, with a fixed weight b
  (``last-item-weight``; trained, it drifted negative and lost the gain: docs/popularity-prior.md)
  (both :class:`ScoreTerm`). The
  item tower is either frozen (:mod:`shared_model.item_index`, the base encoder's space) or
  adapted (:meth:`InterestModel.forward_with_items`; see docs/item-tower.md).

Only the LoRA matrices and the heads are trainable; they are exactly the tensors
exchanged with the server (:mod:`shared_model.adapters`). A square projection head on the
user vector was tried and dropped: under DP-SGD its 147k noisy coordinates wrecked the
encoder's zero-shot geometry faster than 24 private steps could learn anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from shared_model.config import RunConfig
from shared_model.encoder import load_encoder, mean_pool
from shared_model.interest_features import FEATURES
from shared_model.sequence_layers import HistoryFeatureHead


def lora_config(cfg: RunConfig) -> LoraConfig:
    """peft LoRA config from the run config (rank, alpha, dropout, target modules)."""
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
    )


class PopularityPrior(nn.Module):
    """The run's popularity prior: ``log_prior``, a buffer over the catalogue's items in
    item-index row order (:mod:`shared_model.popularity`). The server sets it from the silos'
    releases (:meth:`set_prior`) and it is saved with the checkpoint; it is never trained or
    averaged (no parameters: Opacus refuses trainable layers that hold buffers). Until it is
    set every item's prior is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("log_prior", torch.zeros(0))

    def set_prior(self, values: object) -> None:
        prior = torch.as_tensor(values, dtype=torch.float32).flatten()
        if not torch.isfinite(prior).all():
            raise ValueError(f"popularity prior: {int((~torch.isfinite(prior)).sum())} of {prior.numel()} values "
                             "are not finite")
        self.log_prior = prior.to(self.log_prior.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        if prefix + "log_prior" in state_dict:  # variable length: take the saved size first
            self.set_prior(state_dict[prefix + "log_prior"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def has_prior(self) -> bool:
        return self.log_prior.numel() > 0

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """The prior values of item ``rows`` (any shape, on ``rows``' device), 0 without a prior."""
        if not self.has_prior:
            return torch.zeros(rows.shape, device=rows.device)
        if rows.numel() and int(rows.max()) >= self.log_prior.numel():
            raise ValueError(f"popularity prior: {self.log_prior.numel()} values, but item row {int(rows.max())} "
                             "was asked (a prior for another catalogue)")
        return self.log_prior.to(rows.device)[rows]


class ScoreTerm(nn.Module):
    """``score(u, i) += w · value(u, i)``: an additive item-score term with one weight ``w``
    (trained: a head parameter, exchanged, averaged and trained under DP-SGD like θ; or fixed,
    ``requires_grad`` off: then neither sent nor trained, only saved). Two use it:
    the popularity prior (value: ``log prior(i)``, :class:`PopularityPrior`) and the newest
    history item (value: ``logit-scale · cos(e_last, e_i)`` in the item tower,
    :func:`last_item_similarity`). ``forward`` takes the values ``[B, M]`` (so that Opacus
    sees a batch dimension) and returns ``w ·`` them."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([float(weight)]))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.weight * values.to(self.weight.device)


def last_item_similarity(last: torch.Tensor, valid: torch.Tensor, items: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``[B, M]`` ``logit-scale · cos(e_last_b, e_i)``: each user's newest history item ``last``
    ``[B, H]`` against candidates ``items`` (``[M, H]`` shared, or ``[B, M, H]`` per user),
    0 where the user has no newest item in the tower (``valid`` ``[B]`` false). Unit vectors."""
    sim = last @ items.T if items.dim() == 2 else (items * last.unsqueeze(1)).sum(-1)
    return logit_scale * sim.float() * valid.to(sim.device).unsqueeze(1).float()


class InterestModel(nn.Module):
    """User tower + next-interest head. ``forward`` returns (unit user vector, category logits).

    The next-interest logits are ``category_head(h)`` plus, with ``history-features`` on,
    ``history_head(f)``: θ·f_c over the per-category features of the example's own history
    (:mod:`shared_model.interest_features`, a conditional logit: :class:`HistoryFeatureHead`).
    """

    def __init__(self, encoder: PeftModel, num_categories: int, history_features: bool = True,
                 popularity_weight: float | None = None, last_item_weight: float | None = None):
        super().__init__()
        self.encoder = encoder
        self.category_head = nn.Linear(encoder.config.hidden_size, num_categories)
        self.history_head = HistoryFeatureHead(num_categories, len(FEATURES)) if history_features else None
        self.popularity_head = ScoreTerm(popularity_weight) if popularity_weight is not None else None
        self.popularity_prior = PopularityPrior() if popularity_weight is not None else None
        self.last_item_head = ScoreTerm(last_item_weight) if last_item_weight is not None else None

    def popularity_scores(self, rows: torch.Tensor) -> torch.Tensor | None:
        """``w · log prior`` of item ``rows`` ``[B, M]`` (None without a popularity head)."""
        if self.popularity_head is None or self.popularity_prior is None:
            return None
        return self.popularity_head(self.popularity_prior.lookup(rows))

    def last_item_scores(self, similarity: torch.Tensor) -> torch.Tensor | None:
        """``b · similarity`` (:func:`last_item_similarity` ``[B, M]``; None without the term)."""
        return None if self.last_item_head is None else self.last_item_head(similarity)

    def extra_scores(self, rows: torch.Tensor, similarity: torch.Tensor | None) -> torch.Tensor | None:
        """The additive item-score terms of candidates ``rows`` ``[B or 1, M]``: the popularity
        prior and (``similarity`` given) the newest history item; None when there are none."""
        terms = [t for t in (self.popularity_scores(rows),
                             None if similarity is None else self.last_item_scores(similarity)) if t is not None]
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def interest_logits(self, h: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` next-interest logits from user vectors ``h`` and history features ``[B, C, F]``."""
        logits = self.category_head(h)
        if self.history_head is not None:
            logits = logits + self.history_head(features.to(logits.dtype))
        return logits

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pooled(input_ids, attention_mask)
        return F.normalize(h, dim=-1), self.interest_logits(h, features)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit vectors of texts by the adapted encoder (the item tower of ``item-tower = adapted``)."""
        return F.normalize(self.pooled(input_ids, attention_mask), dim=-1)

    def forward_with_items(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: torch.Tensor,
        item_ids: torch.Tensor,
        item_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """User vectors, category logits and the example's own items, in ONE encoder call.

        ``item_ids``/``item_mask``: ``[B, M, L_i]`` — example b's M candidate items (its
        target and its negatives). History and items are stacked example-major into
        ``B·(1+M)`` rows, so every row of the encoder call belongs to exactly one example and
        Opacus' per-row gradients can be summed back per example
        (:func:`fl_client.dp_train.fold_grad_samples`). Returns ``([B, H], [B, C], [B, M, H])``.
        """
        b, m, li = item_ids.shape
        width = max(input_ids.shape[1], li)
        hist = F.pad(input_ids, (0, width - input_ids.shape[1])).unsqueeze(1)
        hist_mask = F.pad(attention_mask, (0, width - attention_mask.shape[1])).unsqueeze(1)
        items = F.pad(item_ids, (0, width - li))
        items_mask = F.pad(item_mask, (0, width - li))
        rows = torch.cat([hist, items], dim=1).reshape(b * (1 + m), width)
        rows_mask = torch.cat([hist_mask, items_mask], dim=1).reshape(b * (1 + m), width)
        pooled = self.pooled(rows, rows_mask).view(b, 1 + m, -1)
        h = pooled[:, 0]
        return F.normalize(h, dim=-1), self.interest_logits(h, features), F.normalize(pooled[:, 1:], dim=-1)


def mask_to_platform(category_logits: torch.Tensor, platform_mask: torch.Tensor) -> torch.Tensor:
    """Restrict next-interest logits to the categories of the target platform.

    The softmax is over the whole catalogue's interest classes, but a next event on
    platform P can only be in P's categories (public: read from the catalogue), so the
    others get -inf. Without this, silos of a platform with one dominant category pull
    the shared head towards it for every platform after averaging.
    """
    return category_logits.float().masked_fill(~platform_mask, float("-inf"))


def category_prior(category_logits: torch.Tensor) -> torch.Tensor:
    """``[B, C+1]`` log p(category | user); column C (unlabelled items) is the mean of the
    finite log-probabilities (categories masked out by :func:`mask_to_platform` excluded),
    or 0 (no prior) when a row has none — no classes at all, or all masked out — rather
    than 0/0 = NaN, which would make every item score NaN."""
    logp = F.log_softmax(category_logits.float(), dim=-1)
    finite = torch.isfinite(logp)
    count = finite.sum(-1, keepdim=True)
    mean = logp.where(finite, torch.zeros_like(logp)).sum(-1, keepdim=True) / count.clamp_min(1)
    return torch.cat([logp, mean], dim=-1)


def item_scores(
    user: torch.Tensor,
    category_logits: torch.Tensor,
    item_emb: torch.Tensor,
    item_prior_index: torch.Tensor,
    logit_scale: float,
    category_weight: float,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores ``[B, N]`` of N candidate items for each user.

    ``item_emb``: unit item vectors ``[N, H]``; ``item_prior_index``: each item's category
    index ``[N]`` (C, the number of categories, for unlabelled items); ``extra``: the items'
    additive terms ``[B, N]`` or ``[1, N]`` (:meth:`InterestModel.extra_scores`).
    """
    prior = category_prior(category_logits)[:, item_prior_index]
    scores = logit_scale * (user @ item_emb.T).float() + category_weight * prior
    return scores if extra is None else scores + extra.float()


def own_item_scores(
    user: torch.Tensor,
    category_logits: torch.Tensor,
    item_emb: torch.Tensor,
    item_prior_index: torch.Tensor,
    logit_scale: float,
    category_weight: float,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score ``[B]`` of row b's own item ``item_emb[b]`` (the paired form of :func:`item_scores`;
    ``extra``: ``[B]``)."""
    prior = category_prior(category_logits).gather(1, item_prior_index.view(-1, 1)).squeeze(1)
    scores = logit_scale * (user * item_emb).sum(-1).float() + category_weight * prior
    return scores if extra is None else scores + extra.float()


def build_model(cfg: RunConfig, num_categories: int, seed: int | None = None) -> InterestModel:
    """A fresh model: base encoder frozen, LoRA + heads initialised from ``seed``.

    The same seed gives the same initial trainable tensors on every machine, so the
    server's initial global model is reproducible. With ``lora-mode = ffa`` the LoRA A
    factors are frozen at that seeded initialisation (the same on every silo and the server),
    so only B and the heads are trainable, sent and averaged.
    """
    if cfg.user_tower == "sequence":
        from shared_model.sequence_model import build_sequence_model

        return build_sequence_model(cfg, num_categories, seed)  # type: ignore[return-value]
    encoder = load_encoder(cfg.base_model)
    for p in encoder.parameters():
        p.requires_grad_(False)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed if seed is None else seed)
    try:
        peft_encoder = get_peft_model(encoder, lora_config(cfg))
        if cfg.lora_mode == "ffa":  # FFA-LoRA: A stays at its seeded (public) initialisation
            for name, p in peft_encoder.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)
        model = InterestModel(peft_encoder, num_categories, cfg.history_features,
                              cfg.popularity_weight if cfg.popularity_prior else None,
                              cfg.last_item_weight if cfg.last_item_score else None)
        if model.last_item_head is not None:  # a fixed weight, chosen on validation users (docs/popularity-prior.md)
            model.last_item_head.weight.requires_grad_(False)
        nn.init.zeros_(model.category_head.bias)
    finally:
        torch.random.set_rng_state(generator_state)
    return model
