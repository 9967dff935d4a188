"""Interest migration and the examples (history, next item, next category, flag) of a silo.

*Migration*: a user's next event on a silo is migrating when its interest class is not
among the interest classes of that user's last ``k`` events on the silo (k=5 default).
It is only defined when the history is non-empty and the target has an interest label; where
undefined, :func:`is_migrating` returns False and :func:`migration_defined` tells the two
apart (rates are reported over users where it is defined).

*Examples*: one per user. Training examples come from train-split users with at least two
events (a single event gives an empty history and teaches a history encoder nothing); a
fresh random cut may be drawn each time a user is sampled. Evaluation examples use the
held-out last event of every valid/test user, also when the history before it is empty.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from shared_model.schema import Catalogue, Event, Example, Silo

DEFAULT_K = 5


def migration_defined(history: Sequence[Event], target: Event, catalogue: Catalogue) -> bool:
    """Whether the migration flag is meaningful: non-empty history and a labelled target."""
    return bool(history) and catalogue.items[target.item_id].interest is not None


def is_migrating(history: Sequence[Event], target: Event, catalogue: Catalogue, k: int = DEFAULT_K) -> bool:
    """True when the target's interest class is not among those of the last ``k`` events."""
    if not migration_defined(history, target, catalogue):
        return False
    recent = {catalogue.items[e.item_id].interest for e in history[-k:]}
    return catalogue.items[target.item_id].interest not in recent


def _example(user_id: str, events: Sequence[Event], cut: int, catalogue: Catalogue, k: int) -> Example:
    history, target = tuple(events[:cut]), events[cut]
    return Example(user_id, history, target, catalogue.items[target.item_id].interest,
                   is_migrating(history, target, catalogue, k))


def train_user_ids(silo: Silo) -> list[str]:
    """Train-split users with at least two events (those that give a training example)."""
    return [u for u in silo.users("train") if len(silo.histories.get(u, ())) >= 2]


def training_example(silo: Silo, catalogue: Catalogue, user_id: str, rng: random.Random | None = None,
                     k: int = DEFAULT_K) -> Example:
    """The user's example: cut at the last event, or at a uniform random target index in [1, n-1]."""
    events = silo.histories[user_id]
    if len(events) < 2:
        raise ValueError(f"user {user_id!r} of silo {silo.name!r} has {len(events)} event(s); a training example needs 2")
    cut = len(events) - 1 if rng is None else rng.randint(1, len(events) - 1)
    return _example(user_id, events, cut, catalogue, k)


def eval_examples(silo: Silo, catalogue: Catalogue, split: str, k: int = DEFAULT_K) -> list[Example]:
    """One example per user of ``split``: the held-out last event as target."""
    return [_example(u, silo.histories[u], len(silo.histories[u]) - 1, catalogue, k)
            for u in silo.users(split) if silo.histories.get(u)]
