"""An over-long history title is bounded before it is tokenised (issue #16: a 100 KB title
took 172 s and 1.2 GB), and every title encodes to the same text as before the fix."""

from __future__ import annotations

import math

import pytest

from shared_model.batches import ExampleBatcher
from shared_model.config import RunConfig
from shared_model.encoder import shared_tokenizer
from shared_model.schema import Catalogue, Event, Item
from shared_model.serialize import CHARS_PER_TOKEN, bound_text, history_text

BUDGET = RunConfig().max_seq_len - 2  # what ExampleBatcher.history passes


def old_history_text(texts: list[str], max_tokens: int, count) -> str:
    """The pre-fix algorithm (drop the last word until the newest text fits), as the oracle."""
    kept: list[str] = []
    used = 0
    sep_cost = count(";")
    for text in reversed(texts):
        cost = count(text) + (sep_cost if kept else 0)
        if used + cost > max_tokens:
            if not kept:
                words = text.split()
                while words and count(" ".join(words)) > max_tokens:
                    words.pop()
                if words:
                    kept.append(" ".join(words))
            break
        kept.append(text)
        used += cost
    return " ; ".join(reversed(kept))


def raw_history(*titles: str) -> tuple[list[Event], Catalogue]:
    items = {f"i{n}": Item(f"i{n}", "arts", t, ()) for n, t in enumerate(titles)}
    return [Event("u", f"i{n}", n) for n in range(len(titles))], Catalogue(items, ["arts"])


@pytest.fixture(scope="module")
def count():
    tok = shared_tokenizer("")
    return lambda s: len(tok.tokenize(s))


WORDS = ("Prismacolor Premier soft-core colored pencils, 72-count (assorted) — für Künstler; "
         "internationalization 1234567890 ½-inch brush № 12 x" * 40).split()


@pytest.mark.parametrize("n_words", [1, 5, 40, 61, 62, 63, 90, 300])
def test_same_text_as_before_for_short_and_long_titles(count, n_words: int) -> None:
    title = " ".join(WORDS[:n_words])
    events, cat = raw_history("Strathmore sketch pad 9x12", title)
    texts = [f" | {t}" for t in ("Strathmore sketch pad 9x12", title)]
    assert history_text(events, cat, BUDGET, count) == old_history_text(texts, BUDGET, count)


def test_a_single_unbroken_word_stays_one_unknown_token(count) -> None:
    events, cat = raw_history("x" * 20_000)
    text = history_text(events, cat, BUDGET, count)
    assert count(text) == 2  # "|" and one [UNK], as before: a word over 100 characters is [UNK]


def test_bound_text_cuts_at_a_word_and_keeps_short_text() -> None:
    assert bound_text("a b c", 1) == "a b c"
    long = "word " * 100  # 500 characters
    assert bound_text(long, 2) == "word " * 40  # 200 characters, whole words
    assert bound_text("ab " * 100, 1) == ("ab " * 34)[:100].rsplit(None, 1)[0]


def test_100_kb_title_costs_log_many_bounded_tokenisations(count) -> None:
    title = " ".join(WORDS * 6)[: 100 * 1024]
    seen: list[int] = []

    def counting(s: str) -> int:
        seen.append(len(s))
        return count(s)

    events, cat = raw_history(title)
    text = history_text(events, cat, BUDGET, counting)
    limit = BUDGET * CHARS_PER_TOKEN
    assert max(seen) <= limit  # never tokenises beyond the bound
    words_in_bound = len(title[:limit].split())
    assert len(seen) <= 2 + math.ceil(math.log2(words_in_bound + 1)) + 1  # separator, whole text, binary search
    prefix = " | " + " ".join(title[:1200].split()[:-1])  # the old result only depends on the leading words
    assert text == old_history_text([prefix], BUDGET, count)
    assert count(text) <= BUDGET < count(text + " " + title.split()[len(text.split()) - 1])


def test_batcher_caches_few_bounded_prefixes_of_a_100_kb_title() -> None:
    cfg = RunConfig()
    events, cat = raw_history(" ".join(WORDS * 6)[: 100 * 1024])
    batcher = ExampleBatcher(cat, [], cfg)
    ids, _ = batcher.history(events)
    assert len(ids) <= cfg.max_seq_len
    assert batcher._count.cache_info().currsize <= 20  # was one entry per word (~15,000 of up to 100 KB)
