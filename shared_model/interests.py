"""Which interest classes each platform uses: a category level chosen by a rule, or derived classes.

The rule (docs/data-format.md, "Interest level"): per platform, among the category levels that at
least half of the platform's items reach, take the **shallowest level with at least
:data:`MIN_CLASSES` classes whose largest class holds at most :data:`MAX_SHARE` of the labelled
items**. When no level meets it, the reachable level with the most classes is taken (shallowest on
a tie). ``dataset.json``'s ``interest_level`` overrides the rule, per platform
(``{"arts": 2, "office": 3}``) or for all (``2``); ``"derived"`` forces derived classes.

A platform where fewer than half of the items have a category at the chosen level (e.g. a
titles-only catalogue) gets derived interests instead: clusters of the frozen base encoder's
item embeddings (:mod:`shared_model.derived_interests`).

A class at level ``n`` is named by its path below the root (``"b > c"`` for level 3), so equal
names under different parents stay distinct; level 2 keeps its bare name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

from shared_model.schema import Catalogue, DataError, Item, Problem

MIN_CLASSES = 8
MAX_SHARE = 0.35
MIN_COVERAGE = 0.5  # below this share of items labelled at the chosen level, interests are derived
DERIVED = "derived"


@dataclass(frozen=True)
class LevelStats:
    """Classes at one category level of one platform."""

    level: int
    labelled: int
    items: int
    classes: int
    largest_share: float

    @property
    def coverage(self) -> float:
        return self.labelled / self.items if self.items else 0.0

    @property
    def meets_rule(self) -> bool:
        return self.classes >= MIN_CLASSES and self.largest_share <= MAX_SHARE


@dataclass(frozen=True)
class InterestChoice:
    """How one platform's interest classes were chosen (recorded in describe and checkpoints)."""

    level: int | None  # the category level used; None for derived interests
    source: str  # "rule", "dataset.json" or "derived"
    rule_level: int | None  # what the rule gives (None: no level reached by half the items)
    coverage: float  # share of the platform's items labelled at ``level`` (derived: 1.0)
    classes: int
    largest_share: float
    derived: dict[str, Any] | None = None  # k, seed, encoder and catalogue hashes when derived

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def level_stats(items: list[Item], level: int) -> LevelStats:
    """Class count and largest share at ``level`` over ``items`` (one platform)."""
    counts = Counter(lab for it in items if (lab := it.path_label(level)) is not None)
    labelled = sum(counts.values())
    largest = max(counts.values()) / labelled if labelled else 0.0
    return LevelStats(level, labelled, len(items), len(counts), largest)


def rule_level(items: list[Item]) -> LevelStats | None:
    """The level the rule picks for one platform's items (module docstring), or None."""
    depth = max((len(it.categories) for it in items), default=0)
    reachable = [s for s in (level_stats(items, n) for n in range(1, depth + 1)) if s.coverage >= MIN_COVERAGE]
    for s in reachable:
        if s.meets_rule:
            return s
    if not reachable:
        return None
    return max(reachable, key=lambda s: (s.classes, -s.level))


def declared_levels(info: dict, platforms: tuple[str, ...]) -> dict[str, int | str]:
    """``dataset.json``'s ``interest_level`` per platform (empty when absent); DataError when malformed."""
    raw = info.get("interest_level")
    if raw is None:
        return {}

    def ok(v: object) -> bool:
        return v == DERIVED or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)

    bad = Problem("dataset.json", 1, "interest_level",
                  f"expected a level >= 1, {DERIVED!r}, or an object of those per platform; got {raw!r}")
    if ok(raw):
        return {p: raw for p in platforms}
    if not isinstance(raw, dict) or not all(ok(v) for v in raw.values()):
        raise DataError([bad])
    unknown = sorted(set(raw) - set(platforms)) if platforms else []
    if unknown:
        raise DataError([Problem("dataset.json", 1, "interest_level", f"unknown platform(s) {', '.join(unknown)}")])
    return dict(raw)


def interest_seed(info: dict) -> int:
    """``dataset.json``'s ``interest_seed`` (default 0): seeds the clustering of derived interests."""
    seed = info.get("interest_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DataError([Problem("dataset.json", 1, "interest_seed", f"expected a non-negative integer, got {seed!r}")])
    return seed


def choose(items: list[Item], declared: int | str | None) -> InterestChoice:
    """The interest choice of one platform from its items and its ``dataset.json`` override."""
    by_rule = rule_level(items)
    r_level = by_rule.level if by_rule else None
    if declared == DERIVED:
        return InterestChoice(None, DERIVED, r_level, 1.0, 0, 0.0)
    if isinstance(declared, int):
        level, source = declared, "dataset.json"
    elif by_rule is not None:
        level, source = by_rule.level, "rule"
    else:
        return InterestChoice(None, DERIVED, None, 1.0, 0, 0.0)
    s = level_stats(items, level)
    if s.coverage < MIN_COVERAGE:
        return InterestChoice(None, DERIVED, r_level, 1.0, 0, 0.0)
    return InterestChoice(level, source, r_level, round(s.coverage, 4), s.classes, round(s.largest_share, 4))


def assign_interests(catalogue: Catalogue, info: dict, base_model: str | None = None,
                     max_tokens: int = 32) -> Catalogue:
    """The catalogue with every item's interest level (or derived class) set, per platform.

    Derived classes need the frozen base encoder's item embeddings (cached); ``base_model``
    and ``max_tokens`` select them and are not used when every platform has a taxonomy.
    """
    declared = declared_levels(info, catalogue.platforms)
    seed = interest_seed(info)
    by_platform: dict[str, list[Item]] = {}
    for it in catalogue.items.values():
        by_platform.setdefault(it.platform, []).append(it)
    choices: dict[str, InterestChoice] = {}
    items = dict(catalogue.items)
    for plat in sorted(by_platform):
        choice = choose(by_platform[plat], declared.get(plat))
        if choice.source == DERIVED:
            from shared_model.derived_interests import derive_platform  # needs torch + the encoder

            labels, meta = derive_platform(catalogue, plat, base_model, max_tokens, seed=seed)
            counts = Counter(labels.values())
            choice = replace(choice, classes=len(counts), largest_share=round(max(counts.values()) / len(labels), 4),
                             derived=meta)
            for iid, lab in labels.items():
                items[iid] = replace(items[iid], derived_interest=lab)
        else:
            for it in by_platform[plat]:
                items[it.item_id] = replace(it, interest_level=choice.level)
        choices[plat] = choice
    return Catalogue(items, catalogue.platforms, {p: c.to_json() for p, c in choices.items()})
