"""Relevance classification of a mined negative candidate (Gecko's LLM scoring of hard-negative candidates).

Asked once per (query, candidate) for every candidate the miner keeps, so the answer is the grade alone: no reason,
the fewest output tokens. The pipeline fuses this grade with query likelihood (`query_likelihood`) by reciprocal rank
fusion, as Gecko does. Needs a capable model: a tiny local LLM grades at chance (docs/design.md).
"""

from __future__ import annotations

from pydantic import BaseModel

from prompts import PromptSpec, RelevanceLevel


class CandidateRelevance(BaseModel):
    relevance: RelevanceLevel


PROMPT = PromptSpec.from_package(
    __name__,
    version="1",
    output_model=CandidateRelevance,
    data_fields=("query", "passage"),
    max_examples=3,
)
