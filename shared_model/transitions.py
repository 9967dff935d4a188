"""The differentially private item-transition release (McSherry & Mironov, KDD 2009,
"Differentially private recommender systems"): a silo's counts of its training users'
item-to-item transitions, their Gaussian release over a public candidate set, and the
table the server builds from the silos' releases.

* :func:`user_pairs`: a user's contribution, at most ``m`` (``transition-max-pairs``)
  distinct UNORDERED pairs of consecutive different items, newest first, each with weight 1.
  Adding or removing one user changes the count vector by at most √m in L2 norm (m
  coordinates by at most 1).
* :func:`pair_counts`: the exact counts of every pair a silo's training users contribute
  (sparse: the non-private run's release).
* :func:`candidate_pairs`: the PUBLIC candidate set of one platform, computed by the server
  from public data only: each item with its ``neighbours`` nearest items by cosine of the
  frozen base-encoder item vectors, plus each item with each of the platform's
  ``popular`` most popular items by the server's summed DP popularity release (an earlier
  DP output: post-processing). Only candidate pairs are counted and released.
* :func:`pair_spaces` / :func:`cross_candidate_pairs`: a region silo (several platforms)
  releases over each of its platforms' candidate pairs and each two platforms' CROSS pairs
  (each item with its ``neighbours`` nearest items of the other platform, and with the other
  platform's ``popular`` items), all in ONE release: a user's ``m`` pairs are counted once
  over their concatenation (the query's spaces must be disjoint, checked by the silo), so
  the sensitivity stays √m.
* :func:`counts_over`: the counts of a silo's pairs over the candidate set; the release is
  :func:`shared_model.popularity.noisy_counts` on it (the Gaussian mechanism, Dwork & Roth
  2014 Thm A.1; in RDP, Mironov 2017 Prop. 7): every coordinate, zero or not, plus
  N(0, (z·√m)²) from the silo's secret randomness, one mechanism ``(z, 1.0, 1)`` to the
  accountant.
* :func:`sum_releases`: the server's sum of a platform's releases (noise std √Σ std²) and
  the threshold, post-processing: a summed count ≤ ``threshold`` × noise std is dropped.
* :class:`TransitionTable`: the result (item rows ``a < b``, counts > 0), which travels in a
  Flower ArrayRecord (:data:`TRANSITIONS_RECORD`) and is saved with checkpoints.

Item rows are rows of the catalogue's item index: positions in ``list(catalogue.items)``
(:class:`shared_model.item_index.ItemIndex`). Measured figures: docs/transitions.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared_model.popularity import noisy_counts, sensitivity  # the same Gaussian mechanism, √m for √c
from shared_model.schema import Silo

__all__ = ["TRANSITIONS_RECORD", "TransitionTable", "user_pairs", "pair_counts", "candidate_pairs",
           "cross_candidate_pairs", "pair_spaces", "space_of", "counts_over",
           "popular_rows", "sum_releases", "noisy_counts", "sensitivity", "query_problem"]

#: The record of a server message that carries the table (arrays ``a``, ``b``, ``counts``).
TRANSITIONS_RECORD = "transitions"

Pairs = tuple[np.ndarray, np.ndarray]


def user_pairs(history: Sequence[int], max_pairs: int, window: int = 1) -> list[tuple[int, int]]:
    """The user's ``max_pairs`` most recent distinct transitions, newest first: ``history``
    is the user's item rows in event order (oldest first); each pair of different items at
    most ``window`` events apart (1: consecutive, the release's definition) gives the
    unordered pair ``(min, max)``, kept once. A negative row (an item outside the index)
    makes no pair."""
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for i in range(len(history) - 1, 0, -1):
        for d in range(1, window + 1):
            if len(out) >= max_pairs:
                return out
            if i - d < 0:
                break
            prev, nxt = int(history[i - d]), int(history[i])
            pair = (min(prev, nxt), max(prev, nxt))
            if prev != nxt and pair[0] >= 0 and pair not in seen:
                seen.add(pair)
                out.append(pair)
    return out


def _keys(a: np.ndarray, b: np.ndarray, num_items: int) -> np.ndarray:
    """One int64 per pair, ordered as the pairs (a, b) lexicographically."""
    return np.asarray(a, dtype=np.int64) * np.int64(num_items) + np.asarray(b, dtype=np.int64)


def pair_counts(silo: Silo, users: Iterable[str], row: Mapping[str, int], max_pairs: int,
                window: int = 1) -> tuple[np.ndarray, ...]:
    """``(a, b, counts)``: every pair the ``users`` contribute (:func:`user_pairs` over their
    histories mapped by ``row``, item id → item row), sorted by (a, b), unique; counts float64.
    An item without a row (not in the index) makes no pair."""
    num_items = max(max(row.values(), default=0) + 1, 1)
    keys = [a * num_items + b for user in users
            for a, b in user_pairs([row.get(ev.item_id, -1) for ev in silo.histories.get(user, [])], max_pairs, window)]
    uniq, counts = np.unique(np.asarray(keys, dtype=np.int64), return_counts=True)
    return uniq // num_items, uniq % num_items, counts.astype(np.float64)


def pair_spaces(platforms: Sequence[str]) -> list[str]:
    """The pair spaces a silo holding ``platforms`` releases over, in this order: each
    platform's own pairs (named by the platform), then each two platforms' cross pairs
    (``"a|b"``, in the given order). One platform: just its own."""
    plats = list(platforms)
    return [*plats, *(f"{a}|{b}" for i, a in enumerate(plats) for b in plats[i + 1:])]


def space_of(platform_a: str, platform_b: str, order: Sequence[str]) -> str:
    """The pair space of a pair of items of these platforms (``order``: the catalogue's platforms)."""
    if platform_a == platform_b:
        return platform_a
    a, b = sorted((platform_a, platform_b), key=list(order).index)
    return f"{a}|{b}"


def _nearest(emb: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, k: int, same: bool, chunk: int) -> list[np.ndarray]:
    """Each ``src`` row with its ``k`` nearest ``dst`` rows by cosine (itself excluded when
    ``same``), as ``[2, n·k]`` arrays, ``chunk`` sources at a time."""
    e_src = torch.nn.functional.normalize(emb[src].float(), dim=-1)
    e_dst = e_src if same else torch.nn.functional.normalize(emb[dst].float(), dim=-1)
    k = min(int(k), len(dst) - (1 if same else 0))
    parts: list[np.ndarray] = []
    if k <= 0:
        return parts
    for start in range(0, len(src), chunk):
        sims = e_src[start:start + chunk] @ e_dst.T
        own = torch.arange(start, min(start + chunk, len(src)))
        if same:
            sims[own - start, own] = -torch.inf
        nearest = sims.topk(k, dim=1).indices
        left = src[own].unsqueeze(1).expand_as(nearest)
        parts.append(torch.stack([left.flatten(), dst[nearest].flatten()]).numpy())
    return parts


def _with(rows: np.ndarray, popular: np.ndarray) -> list[np.ndarray]:
    """Each of ``rows`` with each of ``popular`` (an item never with itself)."""
    if not (len(popular) and len(rows)):
        return []
    left, right = np.repeat(rows, len(popular)), np.tile(popular, len(rows))
    keep = left != right
    return [np.stack([left[keep], right[keep]])]


def _pairs(parts: list[np.ndarray]) -> Pairs:
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    both = np.concatenate(parts, axis=1)
    a, b = both.min(axis=0), both.max(axis=0)
    num_items = int(max(int(both.max()) + 1, 1))
    keys = np.unique(_keys(a, b, num_items))
    return keys // num_items, keys % num_items


def candidate_pairs(embeddings: torch.Tensor | np.ndarray, rows: Sequence[int] | np.ndarray, neighbours: int,
                    popular: Sequence[int] | np.ndarray = (), chunk: int = 1024) -> Pairs:
    """``(a, b)`` int64, a < b, unique, sorted: the candidate pairs of one platform.

    ``embeddings``: the item index's unit vectors (all catalogue rows); ``rows``: the
    platform's item rows. Each item is paired with its ``neighbours`` nearest platform
    items by cosine (itself excluded; top-k over ``chunk`` items at a time, never the whole
    similarity matrix) and with every one of the ``popular`` item rows."""
    rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    parts = _nearest(torch.as_tensor(embeddings), rows_t, rows_t, neighbours, True, chunk)
    return _pairs(parts + _with(rows_t.numpy(), np.asarray(popular, dtype=np.int64)))


def cross_candidate_pairs(embeddings: torch.Tensor | np.ndarray, rows_a: Sequence[int] | np.ndarray,
                          rows_b: Sequence[int] | np.ndarray, neighbours: int,
                          popular_a: Sequence[int] | np.ndarray = (), popular_b: Sequence[int] | np.ndarray = (),
                          chunk: int = 1024) -> Pairs:
    """``(a, b)`` int64, a < b, unique, sorted: the candidate CROSS pairs of two platforms —
    each item of A with its ``neighbours`` nearest items of B and with B's ``popular_b``
    items, and each item of B likewise with A's. Every pair holds one item of each platform."""
    emb = torch.as_tensor(embeddings)
    ra = torch.as_tensor(np.asarray(rows_a, dtype=np.int64))
    rb = torch.as_tensor(np.asarray(rows_b, dtype=np.int64))
    parts = _nearest(emb, ra, rb, neighbours, False, chunk) + _nearest(emb, rb, ra, neighbours, False, chunk)
    parts += _with(ra.numpy(), np.asarray(popular_b, dtype=np.int64)) + _with(rb.numpy(), np.asarray(popular_a, dtype=np.int64))
    return _pairs(parts)


def popular_rows(summed: np.ndarray, platform_rows: Sequence[int] | np.ndarray, popular: int) -> np.ndarray:
    """The item rows of the ``popular`` largest summed counts (``summed`` over the platform's
    items, in ``platform_rows`` order: a DP release, so this is post-processing)."""
    summed = np.asarray(summed, dtype=np.float64)
    if len(summed) != len(platform_rows):
        raise ValueError(f"{len(summed)} summed counts for {len(platform_rows)} platform items")
    order = np.argsort(-summed, kind="stable")[: max(int(popular), 0)]
    return np.asarray(platform_rows, dtype=np.int64)[order]


def counts_over(pairs: tuple[np.ndarray, np.ndarray, np.ndarray], candidates: Pairs, num_items: int) -> np.ndarray:
    """The ``(a, b, counts)`` of :func:`pair_counts` over the (sorted, unique) ``candidates``:
    one float64 per candidate pair, 0 where no user has it; pairs outside are not counted."""
    ca, cb = candidates
    out = np.zeros(len(ca), dtype=np.float64)
    if not len(ca) or not len(pairs[0]):
        return out
    cand = _keys(ca, cb, num_items)
    keys = _keys(pairs[0], pairs[1], num_items)
    at = np.clip(np.searchsorted(cand, keys), 0, len(cand) - 1)
    hit = cand[at] == keys
    out[at[hit]] = np.asarray(pairs[2], dtype=np.float64)[hit]
    return out


def query_problem(a: np.ndarray | None, b: np.ndarray | None, platform_rows: np.ndarray, num_items: int,
                  max_len: int) -> str | None:
    """Why a candidate query cannot be answered (one line), or None: ``a``, ``b`` present,
    1-D integer arrays of one length ≤ ``max_len``, a < b, rows in [0, ``num_items``) and of
    the silo's platform (``platform_rows``), sorted and unique."""
    if a is None or b is None:
        return "the query lacks its candidate pairs (arrays a and b)"
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or b.ndim != 1 or len(a) != len(b):
        return f"candidate arrays of shapes {list(a.shape)} and {list(b.shape)}: expected two 1-D arrays of one length"
    if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
        return f"candidate arrays of dtypes {a.dtype} and {b.dtype}: expected integer item rows"
    if len(a) > max_len:
        return f"{len(a)} candidate pairs > {max_len} (platform items × (transition-neighbours + transition-popular))"
    if not len(a):
        return None
    if int(a.min()) < 0 or int(b.max()) >= num_items:
        return f"candidate rows outside [0, {num_items})"
    if not np.all(a < b):
        return f"{int(np.sum(a >= b))} candidate pair(s) with a ≥ b (expected a < b)"
    mine = np.zeros(num_items, dtype=bool)
    mine[np.asarray(platform_rows, dtype=np.int64)] = True
    if not (mine[a].all() and mine[b].all()):
        return f"{int(np.sum(~(mine[a] & mine[b])))} candidate pair(s) hold items of another platform"
    keys = _keys(a, b, num_items)
    if not np.all(keys[1:] > keys[:-1]):
        return "candidate pairs not sorted by (a, b) or not unique"
    return None


def sum_releases(releases: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, float]], threshold: float,
                 num_items: int) -> tuple["TransitionTable", float, int]:
    """The table of one platform from its silos' releases ``(a, b, counts, noise std)``
    (dense over one candidate set, or sparse exact counts): counts summed per pair, the sum's
    noise std √Σ std², and the pairs whose sum is > ``threshold`` × that std kept (exact
    counts: > 0). Returns ``(table, noise std, pairs summed)``."""
    std = float(np.sqrt(sum(float(r[3]) ** 2 for r in releases)))
    if not releases:
        return TransitionTable.empty(), std, 0
    keys = np.concatenate([_keys(r[0], r[1], num_items) for r in releases])
    uniq, inverse = np.unique(keys, return_inverse=True)
    summed = np.bincount(inverse, weights=np.concatenate([np.asarray(r[2], np.float64) for r in releases]),
                         minlength=len(uniq))
    keep = (summed > threshold * std) & (summed > 0)
    kept = uniq[keep]
    return (TransitionTable(kept // num_items, kept % num_items, summed[keep].astype(np.float32)), std, len(uniq))


@dataclass(frozen=True)
class TransitionTable:
    """Released transition counts: item rows ``a < b`` (int64), sorted and unique by (a, b),
    and their ``counts`` (float32, > 0). Built only through validation (:meth:`from_arrays`)."""

    a: np.ndarray
    b: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        a = np.asarray(self.a)
        b = np.asarray(self.b)
        counts = np.asarray(self.counts)
        problem = _table_problem(a, b, counts)
        if problem:
            raise ValueError(f"transition table: {problem}")
        object.__setattr__(self, "a", a.astype(np.int64))
        object.__setattr__(self, "b", b.astype(np.int64))
        object.__setattr__(self, "counts", counts.astype(np.float32))

    @classmethod
    def empty(cls) -> "TransitionTable":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.a)

    def arrays(self) -> dict[str, np.ndarray]:
        """``{"a", "b", "counts"}``: what a Flower ArrayRecord or a checkpoint holds."""
        return {"a": self.a, "b": self.b, "counts": self.counts}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "TransitionTable":
        """The table from :meth:`arrays` (any mapping of numpy-convertible arrays);
        ``ValueError`` naming what is wrong (missing, shape, dtype, non-finite, a ≥ b, order)."""
        missing = [k for k in ("a", "b", "counts") if k not in arrays]
        if missing:
            raise ValueError(f"transition table: missing array(s) {', '.join(missing)}")
        return cls(np.asarray(arrays["a"]), np.asarray(arrays["b"]), np.asarray(arrays["counts"]))


def _table_problem(a: np.ndarray, b: np.ndarray, counts: np.ndarray) -> str | None:
    if a.ndim != 1 or b.ndim != 1 or counts.ndim != 1 or not len(a) == len(b) == len(counts):
        return f"arrays of shapes {list(a.shape)}, {list(b.shape)}, {list(counts.shape)}: expected three 1-D arrays " \
               "of one length"
    if len(a) and not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
        return f"a and b are {a.dtype} and {b.dtype}: expected integer item rows"
    if len(a) and not np.issubdtype(counts.dtype, np.number):
        return f"counts are {counts.dtype}: expected numbers"
    if not len(a):
        return None
    if not np.all(np.isfinite(counts)):
        return f"{int(np.sum(~np.isfinite(counts)))} of {len(counts)} counts are not finite"
    if not np.all(counts > 0):
        return f"{int(np.sum(counts <= 0))} of {len(counts)} counts are ≤ 0 (a table keeps counts > 0)"
    if int(a.min()) < 0:
        return "negative item rows"
    if not np.all(a < b):
        return f"{int(np.sum(a >= b))} pair(s) with a ≥ b (expected a < b)"
    ordered = (a[1:] > a[:-1]) | ((a[1:] == a[:-1]) & (b[1:] > b[:-1]))
    if not np.all(ordered):
        return "pairs not sorted by (a, b) or not unique"
    return None
