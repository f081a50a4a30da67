"""Comparing texts (pipelines/text_matching.py): the measures behind the stages' copy, duplicate and edit checks."""

from __future__ import annotations

import pytest

from pipelines.text_matching import (
    copies_example,
    edit_ratio,
    extractive_share,
    first_sentence,
    normalize,
    stable_hash,
    text_key,
    word_edit_distance,
)

JSON_PASSAGE = "The json module encodes Python objects as JSON text."


def test_texts_compare_as_lower_case_words():
    assert normalize("Cerebral  organoids, (2019)!") == ["cerebral", "organoids", "2019"]
    assert text_key("Cerebral organoids.") == text_key("  cerebral ORGANOIDS") == "cerebral organoids"


def test_stable_hash_depends_on_every_part_and_nothing_else():
    assert stable_hash(0, "p1") == stable_hash(0, "p1")
    assert len({stable_hash(0, "p1"), stable_hash(1, "p1"), stable_hash(0, "p2"), stable_hash("0", "p1")}) == 4
    assert 0 <= stable_hash("shard", "p1") < 2**64


def test_a_copy_of_an_example_is_found_up_to_case_punctuation_and_spacing():
    examples = ["Why does my invoice show a fee?", "reset my password"]
    assert copies_example("why does my INVOICE show a fee", examples)
    assert copies_example("Reset my password!", examples)
    assert not copies_example("why does my invoice show two fees?", examples)
    assert not copies_example("reset my password", [])


def test_word_edit_distance_counts_inserted_deleted_and_substituted_words():
    assert word_edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2
    assert word_edit_distance([], ["a", "b"]) == 2
    assert word_edit_distance(["a"], ["a"]) == 0


def test_edit_ratio_is_over_the_longer_text_and_ignores_case_and_punctuation():
    assert edit_ratio("I love it", "I LOVE it!") == 0.0
    assert edit_ratio("I love it", "I hate it") == pytest.approx(1 / 3)
    assert edit_ratio("a b c", "x y z w") == 1.0
    assert edit_ratio("", "") == 0.0


@pytest.mark.parametrize(("text", "sentence"), [
    ("The cornea is immune privileged. Arginase depletes L-arginine.", "The cornea is immune privileged."),
    ("Create an archive file (e.g. zip or tar).  Then return its name.", "Create an archive file (e.g. zip or tar)."),
    ("Heading\n\nBody text. More.", "Heading"),
    ("no sentence end here", "no sentence end here"),
    ("", ""),
])
def test_first_sentence(text, sentence):
    assert first_sentence(text) == sentence


@pytest.mark.parametrize(("query", "share"), [
    ("json module encodes Python objects", 1.0),  # every word pair copied
    ("The JSON module, as text!", 0.5),  # the json, json module / module as, as text: punctuation ignored
    ("how do I turn a dict into text?", 0.0),
    ("json", 1.0),  # one word: measured on the word
    ("yaml", 0.0),
    ("", 0.0),
])
def test_extractive_share(query, share):
    assert extractive_share(query, JSON_PASSAGE) == pytest.approx(share)
