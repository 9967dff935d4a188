"""Deterministic text serialisation of a behaviour history for the encoder.

Each event reads ``category | title`` (category: the item's level-2 category, else its deepest
known level, else empty — taken from the taxonomy, never from the chosen interest level or a
derived class, so the item embeddings that derived interests cluster do not depend on them), followed by `` (view)`` / `` (cart)`` / `` (review)`` when
the event is not a purchase. Events run oldest to newest, joined by :data:`SEPARATOR`. Under
a token budget the newest events are kept; if even the newest event alone is over budget its
text is cut word by word from the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shared_model.schema import DEFAULT_EVENT_TYPE, Catalogue, Event, Item

SEPARATOR = " ; "


def word_count(text: str) -> int:
    """Fallback token estimate: whitespace-separated words."""
    return len(text.split())


def event_text(item: Item, event_type: str = DEFAULT_EVENT_TYPE) -> str:
    """``category | title`` for one event, with `` (type)`` when not a purchase."""
    category = item.level(2) or (item.categories[-1] if item.categories else "")
    text = f"{category} | {item.title}"
    return text if event_type == DEFAULT_EVENT_TYPE else f"{text} ({event_type})"


def history_text(
    history: Sequence[Event],
    catalogue: Catalogue,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> str:
    """The history as text, oldest first; newest events kept within ``max_tokens``.

    Token counts are summed per event plus one separator between events, with
    ``count_tokens`` (e.g. ``lambda s: len(tokenizer.tokenize(s))``) or :func:`word_count`.
    """
    texts = [event_text(catalogue.items[e.item_id], e.event_type) for e in history]
    if max_tokens is None:
        return SEPARATOR.join(texts)
    count = count_tokens or word_count
    sep_cost = count(SEPARATOR.strip())
    kept: list[str] = []
    used = 0
    for text in reversed(texts):
        cost = count(text) + (sep_cost if kept else 0)
        if used + cost > max_tokens:
            if not kept:  # newest event alone is over budget: cut its words from the end
                words = text.split()
                while words and count(" ".join(words)) > max_tokens:
                    words.pop()
                if words:
                    kept.append(" ".join(words))
            break
        kept.append(text)
        used += cost
    return SEPARATOR.join(reversed(kept))
