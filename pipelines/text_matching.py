"""Comparing texts: the word-level measures the stages' copy, duplicate and minimal-edit checks are built on, and the
stable hash their deterministic choices use.

Every measure compares `normalize`d words (lower-cased, punctuation and spacing ignored), so "Cerebral organoids." and
"cerebral organoids" are the same text. A leaf module (it imports nothing from the project), so stages, prompts,
benchmarks and tests can all use the one copy of each measure.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")

_WORDS = re.compile(r"\w+", re.UNICODE)
# A sentence ends at . ! or ? followed by space and a capital, quote or bracket ("e.g. zip" does not end one), or at a
# blank line (a heading, a list).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])|\n\s*\n")


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process and run (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def normalize(text: str) -> list[str]:
    """Lower-cased words: the form texts are compared in when checking copies and duplicates."""
    return _WORDS.findall(text.lower())


def text_key(text: str) -> str:
    """`normalize`d words as one string: two texts with the same key are copies (case, punctuation, spacing aside)."""
    return " ".join(normalize(text))


def copies_example(text: str, examples: Iterable[str]) -> bool:
    """`text` repeats one of the few-shot `examples` a prompt showed, up to case, punctuation and spacing."""
    key = text_key(text)
    return any(text_key(example) == key for example in examples)


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


def word_edit_distance(source: Sequence[str], edited: Sequence[str]) -> int:
    """Levenshtein distance over words (insert, delete, substitute one word)."""
    previous = list(range(len(edited) + 1))
    for i, source_word in enumerate(source, start=1):
        current = [i] + [0] * len(edited)
        for j, edited_word in enumerate(edited, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (source_word != edited_word))
        previous = current
    return previous[-1]


def edit_ratio(source: str, edited: str) -> float:
    """Word edit distance of the normalized texts over the longer one's length: 0 identical, 1 nothing in common."""
    source_words, edited_words = normalize(source), normalize(edited)
    longest = max(len(source_words), len(edited_words))
    return word_edit_distance(source_words, edited_words) / longest if longest else 0.0
