"""Recover category levels and the brand from a flattened Amazon ``item_attribute`` string.

The raw attribute is the lower-cased Amazon category path followed by the brand, with every
separator removed, e.g. ``office products office school supplies desk accessories ... reflex
lab``. Recovery runs over all items of one platform at once (it is data-driven):

1. **Root (level 1).** The platform's Amazon main category, e.g. ``arts crafts sewing`` or
   ``office products``: given by the caller (the converter knows it from the raw data's
   README), else the longest word prefix shared by at least ``min_root_share`` (90 %) of the
   attributes. Every item of the platform gets it as level 1; an attribute that does not
   start with it (e.g. the bare word ``arts``) gets no deeper level. When the root occurs
   again inside the string (a few attributes have title debris glued in front of a second
   copy of the path), parsing starts after its last occurrence.
2. **Brand from the title.** Amazon titles usually start with the brand. When the last k
   words of the attribute equal the first k words of the title (largest such k), those words
   are the brand and the words before them are the item's full category path ("clean" item).
3. **Category nodes.** A word prefix of a path is a category node when at least one clean
   item is filed exactly there (its full path equals that prefix). Prefixes that only branch
   (e.g. ``office`` before ``school supplies`` / ``electronics`` / ``furniture lighting``, or
   ``sewing`` before ``notions supplies`` / ``machines``) are never anyone's full path, so the
   shared first word of sibling names such as *Office & School Supplies* / *Office
   Electronics* is not mistaken for a node of its own.
4. **Items without a title brand.** Their path is the longest prefix of their words that is a
   node; the words after it are the brand.
5. **Levels.** Level 1 is the root; the cut points of a path are its prefixes that are nodes;
   level n+1 is the text between the n-th and the next cut.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

MIN_ROOT_SHARE = 0.9


@dataclass(frozen=True)
class Recovered:
    """Category levels (level 1 first) and brand recovered for one item."""

    levels: tuple[str, ...]
    brand: str


def platform_root(attributes: Sequence[str], min_share: float = MIN_ROOT_SHARE) -> tuple[str, ...]:
    """Longest word prefix shared by at least ``min_share`` of the attributes."""
    words = [a.split() for a in attributes]
    need = min_share * len(words)
    root: tuple[str, ...] = ()
    while True:
        counts = Counter(tuple(w[: len(root) + 1]) for w in words if len(w) > len(root) and tuple(w[: len(root)]) == root)
        if not counts:
            return root
        best, n = counts.most_common(1)[0]
        if n < need:
            return root
        root = best


def title_brand_words(path_words: Sequence[str], title_words: Sequence[str]) -> int:
    """Number of trailing attribute words that equal the title's leading words (0 if none)."""
    for k in range(len(path_words), 0, -1):
        if list(path_words[-k:]) == list(title_words[:k]):
            return k
    return 0


def _after_root(words: list[str], root: tuple[str, ...]) -> list[str] | None:
    """Words after the last occurrence of ``root`` when the attribute starts with it."""
    n = len(root)
    if not root or tuple(words[:n]) != root:
        return None
    start = n
    for i in range(n, len(words) - n + 1):
        if tuple(words[i : i + n]) == root:
            start = i + n
    return words[start:]


def recover_platform(
    items: Sequence[tuple[str, str]], root: str | None = None, min_root_share: float = MIN_ROOT_SHARE
) -> list[Recovered]:
    """Recover levels and brand for every ``(title, attribute)`` of one platform, in order."""
    root_words = tuple(root.split()) if root else platform_root([a for _, a in items], min_root_share)
    root_name = " ".join(root_words)
    rest = [_after_root(attr.split(), root_words) for _, attr in items]

    # Step 2-3: full paths of clean items are the category nodes.
    nodes: set[tuple[str, ...]] = set()
    clean_k: list[int] = []
    for (title, _), w in zip(items, rest):
        k = title_brand_words(w, title.split()) if w else 0
        clean_k.append(k)
        if w and k:
            path = tuple(w[: len(w) - k])
            if path:
                nodes.add(path)

    out: list[Recovered] = []
    for (title, attr), w, k in zip(items, rest, clean_k):
        if w is None:
            out.append(Recovered((root_name,) if root_name else (), ""))
            continue
        if k:
            path_len = len(w) - k
        else:  # step 4: longest node prefix
            path_len = max((i for i in range(1, len(w) + 1) if tuple(w[:i]) in nodes), default=0)
        cuts = [i for i in range(1, path_len + 1) if tuple(w[:i]) in nodes]
        if path_len and (not cuts or cuts[-1] != path_len):
            cuts.append(path_len)
        levels = [root_name]
        prev = 0
        for c in cuts:
            levels.append(" ".join(w[prev:c]))
            prev = c
        out.append(Recovered(tuple(levels), " ".join(w[path_len:])))
    return out
