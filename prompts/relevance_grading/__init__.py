"""LLM relevance grading of a generated (query, passage) pair: a short reason, then a 0-3 grade.

The reason comes first because backends decode the fields in declaration order: the grade then follows from a stated
reason instead of being guessed up front. Needs a capable model: a tiny local LLM grades at chance (docs/design.md).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel

from prompts import NonEmptyText, PromptSpec, RelevanceLevel, at_most_words

# One or two sentences are asked for; 60 words leaves slack and still rejects a model that lost the format.
MAX_REASON_WORDS = 60


class RelevanceGrade(BaseModel):
    reason: Annotated[NonEmptyText, at_most_words(MAX_REASON_WORDS)]
    relevance: RelevanceLevel


PROMPT = PromptSpec.from_package(
    __name__,
    version="1",
    output_model=RelevanceGrade,
    data_fields=("query", "passage"),
    max_examples=4,
)
