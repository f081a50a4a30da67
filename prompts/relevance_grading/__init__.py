"""LLM relevance grading of a generated (query, passage) pair: a short reason, then a 0-3 grade.

The reason comes first because backends decode the fields in declaration order: the grade then follows from a stated
reason instead of being guessed up front. Needs a capable model: a tiny local LLM grades at chance (docs/design.md).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from prompts import NonEmptyText, PromptSpec, at_most_words

#: What each grade means; system.txt states the same rubric to the model.
RELEVANCE_LEVELS: dict[int, str] = {
    0: "irrelevant",
    1: "related but does not answer",
    2: "partially answers",
    3: "fully answers",
}

# One or two sentences are asked for; 60 words leaves slack and still rejects a model that lost the format.
MAX_REASON_WORDS = 60


class RelevanceGrade(BaseModel):
    reason: Annotated[NonEmptyText, at_most_words(MAX_REASON_WORDS)]
    # strict: "2", 2.0 or true mean the model ignored the schema, so the answer is not trusted.
    relevance: Annotated[int, Field(ge=0, le=3, strict=True)]


PROMPT = PromptSpec.from_package(
    __name__,
    version="1",
    output_model=RelevanceGrade,
    data_fields=("query", "passage"),
    max_examples=4,
)
