"""Interest migration and the examples (history, next item, next category, flag) of a silo.

*Migration*: a user's next event on a silo is migrating when its interest class is not
among the interest classes of that user's last ``k`` events on the silo on the next event's
platform (k=5 default; a region silo's history mixes platforms, whose classes differ).
It is only defined when the history is non-empty and the target has an interest label; where
undefined, :func:`is_migrating` returns False and :func:`migration_defined` tells the two
apart (rates are reported over users where it is defined).

*Examples*: one per user. Training examples come from train-split users with at least two
events (a single event gives an empty history and teaches a history encoder nothing); a
fresh random cut may be drawn each time a user is sampled. Evaluation examples use the
held-out last event of every valid/test user, also when the history before it is empty; on
a region silo, the events at the user's highest order, one example each (one per platform),
all with the history before that order (:func:`shared_model.schema.held_out`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from shared_model.schema import Catalogue, Event, Example, Silo, held_out

DEFAULT_K = 5


def migration_defined(history: Sequence[Event], target: Event, catalogue: Catalogue) -> bool:
    """Whether the migration flag is meaningful: a history on the target's platform and a labelled target."""
    return bool(same_platform(history, target, catalogue)) and catalogue.items[target.item_id].interest is not None


def same_platform(history: Sequence[Event], target: Event, catalogue: Catalogue) -> list[Event]:
    """The history's events on the target's platform (all of them on a one-platform silo)."""
    platform = catalogue.items[target.item_id].platform
    return [e for e in history if catalogue.items[e.item_id].platform == platform]


def is_migrating(history: Sequence[Event], target: Event, catalogue: Catalogue, k: int = DEFAULT_K) -> bool:
    """True when the target's interest class is not among those of the last ``k`` events on its platform."""
    if not migration_defined(history, target, catalogue):
        return False
    recent = {catalogue.items[e.item_id].interest for e in same_platform(history, target, catalogue)[-k:]}
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
    """One example per held-out event of every user of ``split``: the last event (a region
    silo: each event at the user's highest order) as target, the events before it as history."""
    out = []
    for u in silo.users(split):
        events = silo.histories.get(u)
        if not events:
            continue
        cut = held_out(events)
        for target in events[cut:]:
            history = tuple(events[:cut])
            out.append(Example(u, history, target, catalogue.items[target.item_id].interest,
                               is_migrating(history, target, catalogue, k)))
    return out
