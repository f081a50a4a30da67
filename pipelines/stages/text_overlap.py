"""How much of one text another repeats: the word-level measures the stages' copy and duplicate checks are built on.

Every measure compares `normalize`d words (lower-cased, punctuation and spacing ignored), so "Cerebral organoids." and
"cerebral organoids" are the same text. Stages import these from here (or `normalize` from `pipelines.stages`); keep
one copy of each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

_WORDS = re.compile(r"\w+", re.UNICODE)
# A sentence ends at . ! or ? followed by space and a capital, quote or bracket ("e.g. zip" does not end one), or at a
# blank line (a heading, a list).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])|\n\s*\n")


def normalize(text: str) -> list[str]:
    """Lower-cased words: the form texts are compared in when checking copies and duplicates."""
    return _WORDS.findall(text.lower())


def first_sentence(text: str) -> str:
    """The text up to its first sentence end (the whole text if it has none)."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def ngrams(items: Sequence[T], n: int) -> list[tuple[T, ...]]:
    """Every run of `n` consecutive items, in order (none when there are fewer than `n`)."""
    return [tuple(items[start : start + n]) for start in range(len(items) - n + 1)]


def longest_common_run(words: Sequence[str], other: Sequence[str]) -> int:
    """Length of the longest run of consecutive words the two share verbatim."""
    best = 0
    previous = [0] * (len(other) + 1)
    for word in words:
        current = [0] * (len(other) + 1)
        for index, other_word in enumerate(other, start=1):
            if word == other_word:
                current[index] = previous[index - 1] + 1
                best = max(best, current[index])
        previous = current
    return best


def word_share(words: Sequence[str], other: Sequence[str]) -> float:
    """Share of the distinct `words` that occur anywhere in `other`, order ignored (0 when `words` is empty)."""
    distinct = set(words)
    return len(distinct & set(other)) / len(distinct) if distinct else 0.0


def trigram_similarity(text: str, other: str) -> float:
    """Jaccard similarity of the two normalized texts' character trigrams: 1 for the same words, near 1 for the same
    words up to an inflection ("cerebral organoid" / "Cerebral organoids": 0.84), 0 when either has no words."""
    words = [normalize(value) for value in (text, other)]
    if not all(words):
        return 0.0
    # Padded with a space at each end, so a word's first and last letters make trigrams of their own.
    grams = [set(ngrams(f" {' '.join(value)} ", 3)) for value in words]
    return len(grams[0] & grams[1]) / len(grams[0] | grams[1])


def extractive_share(text: str, source: str) -> float:
    """Share of `text`'s word bigrams that occur in `source`: 0 every word pair is new, 1 every pair is copied.

    Bigrams, not single words: a query names its passage's topic, so its words come from the passage by nature, while
    a copied word pair is copied phrasing (the "novel n-grams" measure of abstractive summarization); longer n-grams
    would miss a copy reworded every third word. A one-word text is measured on its word.
    """
    words = normalize(text)
    n = min(2, len(words))
    if n == 0:
        return 0.0
    grams = ngrams(words, n)
    source_grams = set(ngrams(normalize(source), n))
    return sum(gram in source_grams for gram in grams) / len(grams)
