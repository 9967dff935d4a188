"""Top-k recommendations for a typed history, through a checkpoint's :class:`Scorer`.

History entries are titles. Each one that equals a catalogue item's title (any platform,
case-insensitive, surrounding spaces ignored) becomes that item — an item of the
requested platform is preferred when several share the title, else the first in
catalogue order — and is serialised like any history event (``category | title``).
An entry without an exact match is used as raw text, serialised as `` | <entry>`` (no
category). Matched items of the requested platform are excluded from the results
(:func:`shared_model.scoring.exclude_history`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared_model.migration import js_divergence, new_interest, recent_distribution
from shared_model.schema import Catalogue, Event, Item
from shared_model.scorer import Scorer
from shared_model.scoring import exclude_history, top_items


class Recommender:
    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        cat = scorer.catalogue
        self.by_title: dict[str, list[str]] = {}
        for iid, it in cat.items.items():
            self.by_title.setdefault(it.title.strip().lower(), []).append(iid)
        self.platform_ids = {p: cat.platform_item_ids(p) for p in cat.platforms}
        self.platform_col = {p: {i: c for c, i in enumerate(ids)} for p, ids in self.platform_ids.items()}

    def resolve(self, titles: Sequence[str], platform: str) -> tuple[list[Event], Catalogue, list[dict[str, Any]]]:
        """History events (matched items or raw-text pseudo-items), the catalogue to serialise
        them with, and a per-entry report."""
        items: dict[str, Item] = {}
        events: list[Event] = []
        report: list[dict[str, Any]] = []
        for n, raw in enumerate(titles):
            text = raw.strip()
            ids = self.by_title.get(text.lower(), [])
            pick = next((i for i in ids if self.scorer.catalogue.items[i].platform == platform), ids[0] if ids else None)
            if pick is not None:
                item = self.scorer.catalogue.items[pick]
                report.append({"input": text, "item_id": pick, "platform": item.platform, "category": item.interest})
            else:
                pick = f"\0raw:{n}"
                item = Item(pick, "", text, ())
                report.append({"input": text, "item_id": None, "platform": None, "category": None})
            items[pick] = item
            events.append(Event("query", pick, n))
        return events, Catalogue(items, self.scorer.catalogue.platforms), report

    def recommend(self, platform: str, titles: Sequence[str], k: int = 10) -> dict[str, Any]:
        """Top-``k`` items, next-interest probabilities, the migration score and the predicted new
        interest (the most probable category outside the recent ones) for one history."""
        if platform not in self.platform_ids:
            raise KeyError(f"unknown platform {platform!r}; known: {', '.join(self.scorer.catalogue.platforms)}")
        if not any(t.strip() for t in titles):
            raise ValueError("empty history: give at least one title")
        t0 = time.perf_counter()
        titles = [t for t in titles if t.strip()]
        events, cat, report = self.resolve(titles, platform)
        scores, probs = self.scorer.score([self.scorer.encode_history(events, platform, cat)], platform)
        scores = scores.clone()  # an inference tensor is read-only outside inference mode
        col = self.platform_col[platform]
        exclude_history(scores, [[col[e.item_id] for e in events if e.item_id in col]])
        values, columns = top_items(scores[0], k)
        probs = probs[0]
        cand = self.platform_ids[platform]
        items = self.scorer.catalogue.items
        out_items = [{"rank": r + 1, "item_id": cand[c], "title": items[cand[c]].title,
                      "category": items[cand[c]].interest, "score": round(float(s), 4)}
                     for r, (s, c) in enumerate(zip(values, columns))]
        p = probs.numpy().astype(np.float64)
        interests = [{"category": self.scorer.categories[i], "probability": round(float(p[i]), 4)}
                     for i in np.argsort(-p, kind="stable") if p[i] > 0]
        here = [e for e in events if getattr(cat.items.get(e.item_id), "platform", None) == platform]
        q = recent_distribution(here, cat, self.scorer.categories, self.scorer.cfg.migration_k)  # on the platform
        mig = None if q is None else round(float(js_divergence(p, q)), 4)
        mass = None if q is None else round(float(1.0 - p[q > 0].sum() / p.sum()), 4)
        pick = None if q is None else new_interest(p, q)
        moving = None
        if pick is not None:
            outside = float(p[q == 0].sum())
            moving = {"category": self.scorer.categories[pick], "probability": round(float(p[pick]), 4),
                      "probability_if_moving": round(float(p[pick]) / outside, 4)}
        elapsed = time.perf_counter() - t0
        return {
            "platform": platform,
            "k": k,
            "history": report,
            "items": out_items,
            "interests": interests,
            "migration_score": mig,
            "migration_outside_recent_mass": mass,
            "new_interest": moving,
            "candidates": len(cand),
            "score_seconds": elapsed,
        }


def percentile_ms(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000.0, q)) if samples else math.nan
