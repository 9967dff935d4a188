"""Non-learned reference predictors, fitted on the train split's events only.

Each predictor answers ``predict(cases, platform) -> (scores [B, N], probabilities [B, C])``
with candidates in the platform's catalogue order and probabilities over the catalogue's
interest classes (zero outside the platform), the interface
:mod:`simulations.evaluation.harness` scores a checkpoint through, so all share candidates,
exclusions and metric code. A case's history may mix platforms (a region silo's, docs/data-format.md);
"train histories" are every train user's events of every silo merged by user id (one timeline:
by ``order``, events of two platforms at one order in catalogue platform order), the same on the
platforms and the regions layout of a dataset.

* ``most-popular``: items by train-event count on the target platform; the next-interest
  distribution is the platform's train category frequency (the majority-class predictor).
* ``category-markov``: next category from the user's last labelled category's transition
  counts, smoothed with the target platform's frequency and masked to its classes. Which
  counts depends on where the history comes from (``Case.source``): a one-platform history
  on A (a platform silo, or a cold-start A→B group) uses A→B counts (A = B: consecutive train
  events on A; A ≠ B: the last A event before each B event of a train user); a region silo's
  mixed history uses the *mixed* counts: the last labelled train event of any platform (order
  strictly below) before each event on B, so an arts category predicts an office one. Next
  item = the most popular item of the most probable category, then of the next, …
* ``history-logit``: the next-interest head's own conditional logit (per-category bias, shared
  θ and per-category δ over :mod:`shared_model.interest_features`), fitted centrally, without
  noise and to convergence on every train user (a few seeded cuts of each silo's history; on a
  region silo the cut's history is its events at lower orders, platforms mixed, and its classes
  are the cut event's platform's) — what that head could reach if privacy and federation cost
  nothing. Next item as for ``category-markov``.
  ``migration_weight > 0`` adds a migration-aware term (the probe of
  :mod:`simulations.evaluation.migration_probe`): on migrating transitions only, the cross
  entropy of the target among the categories *outside* the last k (events on the target's
  platform, :func:`shared_model.migration.recent_distribution`).
* ``item-cooccurrence``: centralised and non-private, an upper reference: score(j) = Σ over
  history items i (any platform) of the number of train users (histories merged over all
  silos by user id, so a pair of an arts and an office item counts) who have both i and j;
  ties broken by popularity. Next-interest distribution: the
  co-occurrence mass per category, smoothed with the platform frequency.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from shared_model.examples import DEFAULT_K
from shared_model.interest_features import FEATURES, history_features
from shared_model.migration import recent_distribution
from shared_model.schema import Catalogue, Silo

SMOOTHING = 1.0  # pseudo-count mass of the platform's category frequency in the Markov rows


class TrainStats:
    """Counts from the train split of every silo (one pass, shared by the baselines)."""

    def __init__(self, catalogue: Catalogue, silos: Mapping[str, Silo]):
        self.catalogue = catalogue
        self.categories = catalogue.interest_vocab()
        self.cat_index = {c: i for i, c in enumerate(self.categories)}
        self.item_ids = list(catalogue.items)
        self.item_col = {i: n for n, i in enumerate(self.item_ids)}
        C = len(self.categories)
        self.item_cat = np.array([self.cat_index.get(catalogue.items[i].interest or "", C) for i in self.item_ids])
        self.platform_cols: dict[str, np.ndarray] = {
            p: np.array([self.item_col[i] for i in catalogue.platform_item_ids(p)], dtype=np.int64)
            for p in catalogue.platforms}
        counts = np.zeros(len(self.item_ids))
        # per train user, their events on every silo, merged by user id
        merged: dict[str, list] = {}
        for silo in silos.values():
            for u in silo.users("train"):
                for e in silo.histories.get(u, ()):
                    counts[self.item_col[e.item_id]] += 1
                merged.setdefault(u, []).extend(silo.histories.get(u, ()))
        self.item_counts = counts
        self.cat_freq: dict[str, np.ndarray] = {}
        self.mask: dict[str, np.ndarray] = {}
        for p, cols in self.platform_cols.items():
            f = np.bincount(self.item_cat[cols], weights=counts[cols], minlength=C + 1)[:C]
            present = np.bincount(self.item_cat[cols], minlength=C + 1)[:C] > 0
            self.mask[p] = present
            f = f + 1e-6 * present  # a category present but never bought keeps a sliver
            self.cat_freq[p] = f / f.sum() if f.sum() > 0 else present / max(present.sum(), 1)
        # transitions: [src platform, dst platform] -> [C+1 (last category, C = none), C]
        self.transitions: dict[tuple[str, str], np.ndarray] = {}
        plats = catalogue.platforms
        for a in plats:
            for b in plats:
                self.transitions[(a, b)] = np.zeros((C + 1, C))
        item_plat = {i: catalogue.items[i].platform for i in self.item_ids}
        for events in merged.values():
            events = sorted(events, key=lambda e: e.order)
            by_plat: dict[str, list] = {}
            for e in events:
                by_plat.setdefault(item_plat[e.item_id], []).append(e)
            for a, ea in by_plat.items():
                labelled = [(e.order, self.item_cat[self.item_col[e.item_id]]) for e in ea
                            if self.item_cat[self.item_col[e.item_id]] < C]
                orders = [o for o, _ in labelled]
                for b, eb in by_plat.items():
                    t = self.transitions[(a, b)]
                    last = C  # within a platform: the previous labelled event's category
                    for e in eb:
                        nxt = self.item_cat[self.item_col[e.item_id]]
                        if a == b:
                            src = last
                        else:
                            pos = bisect.bisect_left(orders, e.order)
                            src = labelled[pos - 1][1] if pos else C
                        if nxt < C:
                            t[src, nxt] += 1
                            last = nxt
        # mixed: [dst platform] -> [C+1 (last labelled category of any platform before it, C = none), C]
        self.mixed_transitions: dict[str, np.ndarray] = {b: np.zeros((C + 1, C)) for b in plats}
        rank = {p: n for n, p in enumerate(plats)}
        for events in merged.values():
            events = sorted(events, key=lambda e: (e.order, rank.get(item_plat[e.item_id], 0)))
            last, n = C, 0
            while n < len(events):  # one order at a time: its events follow the last category before it
                m = n
                while m < len(events) and events[m].order == events[n].order:
                    m += 1
                for e in events[n:m]:
                    nxt = self.item_cat[self.item_col[e.item_id]]
                    if nxt < C:
                        self.mixed_transitions[item_plat[e.item_id]][last, nxt] += 1
                for e in events[n:m]:
                    nxt = self.item_cat[self.item_col[e.item_id]]
                    if nxt < C:
                        last = int(nxt)
                n = m
        # co-occurrence: users × items binary matrix of merged train histories
        rows, cols = [], []
        for r, events in enumerate(merged.values()):
            for c in {self.item_col[e.item_id] for e in events}:
                rows.append(r)
                cols.append(c)
        x = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(merged), len(self.item_ids)))
        co = (x.T @ x).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        self.cooc = co
        self.train_users = len(merged)

    def last_category(self, history: Sequence) -> int:
        """Index of the last labelled event's category; C when none is labelled."""
        C = len(self.categories)
        for e in reversed(history):
            c = self.item_cat[self.item_col[e.item_id]]
            if c < C:
                return int(c)
        return C


class MostPopular:
    name = "most-popular"

    def __init__(self, stats: TrainStats):
        self.stats = stats

    def predict(self, cases: Sequence, platform: str) -> tuple[np.ndarray, np.ndarray]:
        s = self.stats
        pop = s.item_counts[s.platform_cols[platform]]
        return np.tile(pop, (len(cases), 1)), np.tile(s.cat_freq[platform], (len(cases), 1))


class CategoryMarkov:
    name = "category-markov"

    def __init__(self, stats: TrainStats):
        self.stats = stats

    def distributions(self, cases: Sequence, platform: str) -> np.ndarray:
        s = self.stats
        freq, mask = s.cat_freq[platform], s.mask[platform]
        out = np.zeros((len(cases), len(s.categories)))
        for r, case in enumerate(cases):
            table = s.transitions[(case.source, platform)] if case.source in s.platform_cols \
                else s.mixed_transitions[platform]  # a region silo's mixed history
            row = table[s.last_category(case.history)]
            d = (row + SMOOTHING * freq) * mask
            out[r] = d / d.sum()
        return out

    def predict(self, cases: Sequence, platform: str) -> tuple[np.ndarray, np.ndarray]:
        probs = self.distributions(cases, platform)
        return category_then_popularity(self.stats, probs, platform), probs


def category_then_popularity(s: TrainStats, probs: np.ndarray, platform: str) -> np.ndarray:
    """Item scores ``[B, N_platform]``: items of the most probable category first, then of the
    next, …; by train popularity within a category; unlabelled items last."""
    cols = s.platform_cols[platform]
    pop = s.item_counts[cols]
    item_cat = s.item_cat[cols]
    C = len(s.categories)
    scores = np.zeros((len(probs), len(cols)))
    for r in range(len(probs)):
        rank = np.empty(C + 1)
        rank[np.argsort(-probs[r], kind="stable")] = np.arange(C)
        rank[C] = C  # unlabelled items last
        rank[:C][~s.mask[platform]] = C
        scores[r] = -rank[item_cat] * (pop.max() + 1) + pop  # lexicographic: category rank, then popularity
    return scores


class HistoryLogit:
    """``p(c | history) ∝ exp(b_c + Σ_f f_cf·(θ_f + δ_cf))`` — :class:`shared_model.model.HistoryFeatureHead`
    plus the category bias, without the user-vector term (which adds nothing measurable to
    next-interest accuracy on this data; docs/results.md) — fitted by full-batch L-BFGS on
    ``cuts`` seeded random cuts of every train user's history (weight 1/cuts each, so every
    user counts once; on a region silo the events at lower orders than the cut event, platforms
    mixed), restricted to the cut event's platform's categories."""

    name = "history-logit"

    def __init__(self, stats: TrainStats, silos: Mapping[str, Silo], k: int = DEFAULT_K, cuts: int = 4,
                 seed: int = 0, l2: float = 1e-4, migration_weight: float = 0.0):
        self.stats, self.k = stats, k
        if migration_weight:
            self.name = f"history-logit-mig{migration_weight:g}"
        C, F = len(stats.categories), len(FEATURES)
        rng = random.Random(seed)
        feats, labels, weights, masks, recents = [], [], [], [], []
        cat = stats.catalogue
        for name in sorted(silos):
            silo = silos[name]
            for u in silo.users("train"):
                events = silo.histories.get(u, ())
                if len(events) < 2:
                    continue
                picks = rng.sample(range(1, len(events)), min(cuts, len(events) - 1))
                for cut in picks:
                    target = events[cut]
                    c = stats.item_cat[stats.item_col[target.item_id]]
                    if c >= C:
                        continue
                    # the events before the cut (a region silo: at lower orders, another platform's
                    # event at the target's order is not history)
                    history = [e for e in events[:cut] if e.order < target.order]
                    feats.append(history_features(history, cat, stats.cat_index, k))
                    labels.append(int(c))
                    weights.append(1.0 / len(picks))
                    masks.append(self.platform_mask(cat.items[target.item_id].platform))
                    q = recent_distribution(history, cat, stats.categories, k, target)
                    recents.append(torch.zeros(C, dtype=torch.bool) if q is None else torch.as_tensor(q > 0))
        self.examples = len(labels)
        self.bias = torch.zeros(C, dtype=torch.float64)
        self.shared = torch.zeros(F, dtype=torch.float64)
        self.per_category = torch.zeros(C, F, dtype=torch.float64)
        if not labels:
            return
        x = torch.stack(feats).double()
        y = torch.tensor(labels)
        w = torch.tensor(weights, dtype=torch.float64)
        m = torch.stack(masks)
        recent = torch.stack(recents)  # the last k events' categories on the target's platform
        migrating = recent.any(1) & ~recent.gather(1, y.view(-1, 1)).squeeze(1)
        params = [p.requires_grad_(True) for p in (self.bias, self.shared, self.per_category)]
        opt = torch.optim.LBFGS(params, max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = self._logits(x, m)
            loss = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()
            if migration_weight and migrating.any():  # "where to", on migrating transitions only
                outside = logits[migrating].masked_fill(recent[migrating], float("-inf"))
                ce = torch.nn.functional.cross_entropy(outside, y[migrating], reduction="none")
                loss = loss + migration_weight * (ce * w[migrating]).sum() / w.sum()
            loss = loss + l2 * sum((p**2).sum() for p in params)
            loss.backward()
            return loss

        opt.step(closure)
        for p in params:
            p.requires_grad_(False)

    def platform_mask(self, platform: str) -> torch.Tensor:
        return torch.as_tensor(self.stats.mask[platform], dtype=torch.bool)

    def _logits(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.bias + (x * (self.shared + self.per_category)).sum(-1)
        return logits.masked_fill(~mask, float("-inf"))

    def distributions(self, cases: Sequence, platform: str) -> np.ndarray:
        s = self.stats
        if not cases:
            return np.zeros((0, len(s.categories)))
        x = torch.stack([history_features(c.history, s.catalogue, s.cat_index, self.k) for c in cases]).double()
        with torch.no_grad():
            return torch.softmax(self._logits(x, self.platform_mask(platform)), -1).numpy()

    def predict(self, cases: Sequence, platform: str) -> tuple[np.ndarray, np.ndarray]:
        probs = self.distributions(cases, platform)
        return category_then_popularity(self.stats, probs, platform), probs


class ItemCooccurrence:
    name = "item-cooccurrence"

    def __init__(self, stats: TrainStats):
        self.stats = stats

    def predict(self, cases: Sequence, platform: str) -> tuple[np.ndarray, np.ndarray]:
        s = self.stats
        cols = s.platform_cols[platform]
        rows, hcols = [], []
        for r, case in enumerate(cases):
            for c in {s.item_col[e.item_id] for e in case.history}:
                rows.append(r)
                hcols.append(c)
        h = sp.csr_matrix((np.ones(len(rows)), (rows, hcols)), shape=(len(cases), len(s.item_ids)))
        co = np.asarray((h @ s.cooc[:, cols]).todense())
        pop = s.item_counts[cols]
        scores = co + 0.5 * pop / (pop.max() + 1)  # popularity only breaks ties (co-occurrence counts are integers)
        C = len(s.categories)
        item_cat = s.item_cat[cols]
        onehot = sp.csr_matrix((np.ones(int((item_cat < C).sum())), (np.flatnonzero(item_cat < C), item_cat[item_cat < C])),
                               shape=(len(cols), C))
        mass = np.asarray(onehot.T.dot(co.T).T)
        total = mass.sum(1, keepdims=True)
        freq = s.cat_freq[platform]
        with np.errstate(invalid="ignore", divide="ignore"):
            probs = np.where(total > 0, mass / np.where(total > 0, total, 1) + 0.1 * freq, freq)
        probs = probs * s.mask[platform]
        return scores, probs / probs.sum(1, keepdims=True)


def all_baselines(catalogue: Catalogue, silos: Mapping[str, Silo]) -> list:
    stats = TrainStats(catalogue, silos)
    return [MostPopular(stats), CategoryMarkov(stats), HistoryLogit(stats, silos), ItemCooccurrence(stats)]
