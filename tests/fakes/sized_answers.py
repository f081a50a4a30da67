"""Answers the size a capable model writes, for the fake Gemini server: what a dry run's estimate is measured against.

The fake server's default answers ("fake answer" in every field) are a few tokens long; a real model's query or
grading answer is closer to the prompts' own few-shot examples. These answers have that size, and pass the query
filters (they neither copy the passage nor repeat an example).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any


def _title(user_turn: str) -> str:
    match = re.search(r"<title>\n?(.*?)\n?</title>", user_turn, re.S)
    return match.group(1).strip() if match and match.group(1).strip() else "this module"


def sized_answer(body: Mapping[str, Any]) -> str:
    """A query-generation, grading or candidate-scoring answer of realistic length (the runs using it ask no other
    prompt)."""
    system = body["systemInstruction"]["parts"][0]["text"]
    user = body["contents"][-1]["parts"][0]["text"]
    if system.startswith("You write search queries"):
        return json.dumps({"task": "Given a Python programming question, retrieve documentation that answers it",
                           "query": f"how do I use {_title(user)} in a real program?"})
    if system.startswith("You grade search results"):
        return json.dumps({"reason": "The passage documents the function the query asks about.", "relevance": 3})
    if system.startswith("You judge candidate search results"):
        return json.dumps({"relevance": 1})
    raise AssertionError(f"unexpected prompt: {system[:80]}")


def gemini_like_tokens(text: str) -> int:
    """About 4 characters a token, as Google documents for Gemini models."""
    return -(-len(text) // 4)
