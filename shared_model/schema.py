"""Types both sides agree on: catalogue items, silo events, examples, and data errors.

The on-disk format these types are read from is documented in ``docs/data-format.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EVENT_TYPES: tuple[str, ...] = ("view", "cart", "purchase", "review")
DEFAULT_EVENT_TYPE = "purchase"
SPLITS: tuple[str, ...] = ("train", "valid", "test")


@dataclass(frozen=True)
class Problem:
    """One defect in an input file, printed as ``file:line: field: reason``."""

    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.reason}"


class DataError(ValueError):
    """Bad input data. ``problems`` lists every defect found (the message shows the first 50)."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        shown = "\n".join(str(p) for p in self.problems[:50])
        more = len(self.problems) - 50
        super().__init__(shown + (f"\n... and {more} more problems" if more > 0 else ""))


@dataclass(frozen=True)
class Item:
    """A public catalogue item. ``categories`` is the category path, level 1 first.

    ``interest_level`` is the platform's interest level and ``derived_interest`` the derived
    class of a platform without a usable taxonomy; both are set once, by
    :func:`shared_model.interests.assign_interests` when the catalogue is loaded.
    """

    item_id: str
    platform: str
    title: str
    categories: tuple[str, ...] = ()
    brand: str = ""
    interest_level: int = 2
    derived_interest: str | None = None

    def level(self, n: int) -> str | None:
        """Category at level ``n`` (1-based), or None when the path is shorter."""
        return self.categories[n - 1] if len(self.categories) >= n else None

    def path_label(self, n: int) -> str | None:
        """The class at level ``n``: its path below the root (``"a > b"`` for level 3), or None."""
        if len(self.categories) < n:
            return None
        return self.categories[0] if n == 1 else " > ".join(self.categories[1:n])

    @property
    def interest(self) -> str | None:
        """The interest label: the derived class, else the path label at the platform's level."""
        return self.derived_interest if self.derived_interest is not None else self.path_label(self.interest_level)


@dataclass(frozen=True)
class Event:
    """One behaviour event of a user on a silo; ``order`` is a position or a timestamp."""

    user_id: str
    item_id: str
    order: int
    event_type: str = DEFAULT_EVENT_TYPE


@dataclass(frozen=True)
class Example:
    """One training/evaluation example: a user's history before a cut and the next event."""

    user_id: str
    history: tuple[Event, ...]
    target: Event
    target_category: str | None
    migrating: bool


@dataclass
class Catalogue:
    """The public item catalogue of a dataset (all platforms)."""

    items: dict[str, Item]
    platforms: tuple[str, ...] = field(default=())
    # per platform: how its interest classes were chosen (shared_model.interests.InterestChoice)
    interest_choice: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.platforms:
            self.platforms = tuple(sorted({it.platform for it in self.items.values()}))

    def platform_item_ids(self, platform: str) -> list[str]:
        """Item ids of one platform, in catalogue order."""
        return [i for i, it in self.items.items() if it.platform == platform]

    def interest_vocab(self) -> list[str]:
        """Sorted interest labels over the whole catalogue: the next-interest classes."""
        return sorted({it.interest for it in self.items.values() if it.interest})


@dataclass
class Silo:
    """What one silo holds: its users' splits and their event histories (sorted by order).

    ``platforms``: the platforms whose events it holds — one for a platform silo, several for a
    region silo (one region's users on every platform, ``silo.json``; docs/data-format.md). A
    single name may be given. For valid/test users the events at the user's highest order are
    the held-out next items (:func:`held_out`): one per platform at most.
    """

    name: str
    platforms: tuple[str, ...]
    splits: dict[str, str]
    histories: dict[str, list[Event]]

    def __post_init__(self) -> None:
        if isinstance(self.platforms, str):
            self.platforms = (self.platforms,)
        self.platforms = tuple(self.platforms)

    @property
    def platform(self) -> str:
        """The platform of a one-platform silo; a region silo has several (:attr:`platforms`)."""
        if len(self.platforms) != 1:
            raise ValueError(f"silo {self.name!r} holds platforms {', '.join(self.platforms) or '(none)'}, not one; "
                             "this step handles one-platform silos only")
        return self.platforms[0]

    @property
    def mixed(self) -> bool:
        """Whether the silo holds several platforms (a region silo)."""
        return len(self.platforms) > 1

    def users(self, split: str) -> list[str]:
        return [u for u, s in self.splits.items() if s == split]


def held_out(history: list[Event]) -> int:
    """Index of the first held-out event of a valid/test history: the events at the highest
    order (one per platform at most, sorted by platform), so ``history[:i]`` is the input."""
    if not history:
        return 0
    last = history[-1].order
    i = len(history) - 1
    while i > 0 and history[i - 1].order == last:
        i -= 1
    return i
