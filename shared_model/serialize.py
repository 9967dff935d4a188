"""Deterministic text serialisation of a behaviour history for the encoder.

Each event reads ``category | title`` (category: the item's level-2 category, else its deepest
known level, else empty — taken from the taxonomy, never from the chosen interest level or a
derived class, so the item embeddings that derived interests cluster do not depend on them), followed by `` (view)`` / `` (cart)`` / `` (review)`` when
the event is not a purchase. Events run oldest to newest, joined by :data:`SEPARATOR`. Under
a token budget the newest events are kept; if even the newest event alone is over budget its
text keeps the longest run of leading words that fits (:func:`fit_words`).

An event's text is bounded before it is tokenised: only its first
``max_tokens × CHARS_PER_TOKEN`` characters (cut back to a whole word) are read. A WordPiece
token covers at most 100 characters of a word (BERT's ``max_input_chars_per_word``), so the
text beyond could only matter for input whose tokens average more than
:data:`CHARS_PER_TOKEN` characters; a 100 KB title costs a few tokenisations of ~13 KB, not
one per word.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shared_model.schema import DEFAULT_EVENT_TYPE, Catalogue, Event, Item

SEPARATOR = " ; "
#: Characters read per token of budget (see the module docstring).
CHARS_PER_TOKEN = 100
#: BERT's ``max_input_chars_per_word``: a longer word is one ``[UNK]`` token.
WORD_CHARS = 100


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
    texts = [bound_text(t, max_tokens) for t in texts]
    count = count_tokens or word_count
    sep_cost = count(SEPARATOR.strip())
    kept: list[str] = []
    used = 0
    for text in reversed(texts):
        cost = count(text) + (sep_cost if kept else 0)
        if used + cost > max_tokens:
            if not kept:  # newest event alone is over budget: keep the leading words that fit
                fitted = fit_words(text.split(), max_tokens, count)
                if fitted:
                    kept.append(fitted)
            break
        kept.append(text)
        used += cost
    return SEPARATOR.join(reversed(kept))


def bound_text(text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens × CHARS_PER_TOKEN`` characters, back to a whole word."""
    limit = max(max_tokens, 1) * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    head = text[:limit]
    if text[limit].isspace() or head[-1].isspace():
        return head
    parts = head.rsplit(None, 1)
    if len(parts[-1]) >= WORD_CHARS:  # the whole word is longer still: one [UNK] token, cut or not
        return head
    return parts[0] if len(parts) == 2 else ""  # the cut fell inside a word: drop that partial word


def fit_words(words: Sequence[str], max_tokens: int, count: Callable[[str], int]) -> str:
    """The longest run of leading ``words`` whose token count is ≤ ``max_tokens``, joined by spaces.

    Binary search over the number of words: O(log n) calls of ``count`` instead of one per
    word. The same result as dropping words from the end one at a time, because a BERT token
    count of leading words never falls when a word is added (whitespace splits first)."""
    lo, hi = 0, len(words)  # invariant: words[:lo] fits; words[:hi + 1] does not (or hi = len)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])
