"""Interest classes derived from item text, for a platform without a usable category taxonomy.

* **Embeddings.** The platform's items as the frozen base encoder embeds them
  (:func:`shared_model.item_index.build_item_index`, cached): public data only.
* **Clusters.** k-means (:func:`scipy.cluster.vq.kmeans2`, k-means++ seeding, 20 iterations) with
  a ``numpy`` generator seeded by ``seed``: deterministic given the seed and the embeddings.
* **k.** :func:`choose_k`: the rule of thumb k ≈ √(n/2) for n items (Mardia, Kent & Bibby 1979,
  *Multivariate Analysis*, §13.2), bounded to [:data:`K_MIN`, :data:`K_MAX`]. The lower bound is
  the taxonomy rule's minimum class count (:data:`shared_model.interests.MIN_CLASSES`); the upper
  bound keeps each class at hundreds of items on a catalogue of 10⁴ items, so the next-interest
  head sees every class in training, and keeps the class names distinct.
* **Names.** Each class is named ``"<platform>: t1 t2 t3"`` from its three highest-weighted title
  terms under class-based TF-IDF (Grootendorst 2022, BERTopic, arXiv:2203.05794):
  W(t, c) = tf(t, c) · log(1 + A / f(t)), with tf(t, c) the number of the class's titles that
  contain t, f(t) that number over the whole platform and A the mean number of terms per class.
* **Cache.** ``$FEDSHIFT_CACHE/interests-<encoder sha>-<catalogue sha>-<tokens>-<platform>-k<k>-s<seed>.json``,
  keyed by both the base model and the catalogue, written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any

import numpy as np

from shared_model.io_utils import write_bytes_atomic
from shared_model.schema import Catalogue

K_MIN, K_MAX = 8, 32
ITERATIONS = 20
NAME_TERMS = 3
METHOD = "kmeans2-pp-v1"  # part of the cache key: bump when clustering or naming changes
STOPWORDS = frozenset(
    "and the for with of to in on by from or a an x pk pcs pack set size inch inches new use each per".split()
)
_WORD = re.compile(r"[a-z][a-z]+")


def choose_k(n: int) -> int:
    """Number of derived classes for ``n`` items: round(√(n/2)) bounded to [K_MIN, K_MAX], at most n."""
    return min(n, max(K_MIN, min(K_MAX, round(math.sqrt(n / 2)))))


def cluster(embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means labels ``0..k'-1`` (empty clusters dropped, relabelled by first occurrence)."""
    from scipy.cluster.vq import kmeans2

    data = np.asarray(embeddings, dtype=np.float64)
    if not np.isfinite(data).all():
        raise ValueError("item embeddings are not finite; cannot derive interests")
    _, raw = kmeans2(data, k, iter=ITERATIONS, minit="++", missing="warn", rng=np.random.default_rng(seed))
    order = {c: i for i, c in enumerate(dict.fromkeys(raw.tolist()))}
    return np.array([order[c] for c in raw.tolist()], dtype=np.int64)


def title_terms(title: str) -> set[str]:
    """Distinct lower-case words (2+ letters, no stop words) of a title."""
    return {w for w in _WORD.findall(title.lower()) if w not in STOPWORDS}


def class_names(titles: list[str], labels: np.ndarray, prefix: str) -> list[str]:
    """One readable name per class ``0..max(labels)`` by class-based TF-IDF (module docstring)."""
    k = int(labels.max()) + 1 if len(labels) else 0
    tf = [Counter() for _ in range(k)]
    for title, c in zip(titles, labels.tolist()):
        tf[c].update(title_terms(title))
    total = Counter()
    for counts in tf:
        total.update(counts)
    mean_terms = sum(total.values()) / max(k, 1)
    names: list[str] = []
    for c, counts in enumerate(tf):
        ranked = sorted(counts, key=lambda t: (-counts[t] * math.log(1 + mean_terms / total[t]), t))
        name = f"{prefix}: " + " ".join(ranked[:NAME_TERMS]) if ranked else f"{prefix}: class {c}"
        extra = NAME_TERMS
        while name in names and extra < len(ranked):
            name += " " + ranked[extra]
            extra += 1
        if name in names:
            name += f" #{c}"
        names.append(name)
    return names


def derive_platform(catalogue: Catalogue, platform: str, base_model: str | None, max_tokens: int,
                    seed: int = 0) -> tuple[dict[str, str], dict[str, Any]]:
    """``{item_id: class name}`` for every item of ``platform``, and the provenance recorded in
    describe and checkpoints. Cached (module docstring)."""
    from shared_model.encoder import model_hash
    from shared_model.item_index import build_item_index, cache_dir, catalogue_hash

    ids = catalogue.platform_item_ids(platform)
    k = choose_k(len(ids))
    enc_sha, cat_sha = model_hash(base_model), catalogue_hash(catalogue)
    meta = {"method": METHOD, "k": k, "seed": seed, "base-model-sha256": enc_sha, "catalogue-sha256": cat_sha,
            "max-item-tokens": max_tokens}
    path = cache_dir() / f"interests-{enc_sha[:16]}-{cat_sha[:16]}-{max_tokens}-{platform}-k{k}-s{seed}-{METHOD}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("item_ids") == ids and len(saved.get("labels", [])) == len(ids):
                return dict(zip(ids, saved["labels"])), meta
        except (OSError, ValueError):
            pass  # unreadable cache: recompute and replace it
    index = build_item_index(catalogue, base_model, max_tokens)
    rows = [index.row[i] for i in ids]
    labels = cluster(index.embeddings[rows].numpy(), k, seed)
    names = class_names([catalogue.items[i].title for i in ids], labels, platform)
    named = [names[c] for c in labels.tolist()]
    write_bytes_atomic(path, json.dumps({"meta": meta, "item_ids": ids, "labels": named}).encode("utf-8"))
    return dict(zip(ids, named)), meta
