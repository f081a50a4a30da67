"""Relevance classification of a mined negative candidate (Gecko's LLM scoring of hard-negative candidates).

Asked once per (query, candidate) for every candidate the miner keeps, so the answer is the grade alone: no reason,
the fewest output tokens. The pipeline fuses this grade with query likelihood (`query_likelihood`) by reciprocal rank
fusion, as Gecko does. Needs a capable model: a tiny local LLM grades at chance (docs/design.md).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from prompts import PromptSpec


class CandidateRelevance(BaseModel):
    #: 0 irrelevant, 1 related but does not answer, 2 partially answers, 3 fully answers (same scale as grading).
    # strict: "2", 2.0 or true mean the model ignored the schema, so the answer is not trusted.
    relevance: Annotated[int, Field(ge=0, le=3, strict=True)]


PROMPT = PromptSpec.from_package(
    __name__,
    version="1",
    output_model=CandidateRelevance,
    data_fields=("query", "passage"),
    max_examples=3,
)
