"""Gecko-style query generation: a passage and a query type in, a retrieval task description and a query out.

Few-shot examples matter here: measured on this machine, a tiny local LLM (SmolLM2-135M) writes plausible queries only
with them, and zero-shot it echoes the passage. So `render` shows the examples of the requested query type, and they
are kept short.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel

from prompts import NonEmptyText, PromptSpec, at_most_words

#: The query types the template explains and examples.jsonl demonstrates (each needs examples there).
QUERY_TYPES: tuple[str, ...] = ("question", "keywords", "claim", "title")

# 64 words: far above any real search query, well below a copied passage (the typical failure of a weak model).
MAX_QUERY_WORDS = 64
# A task description is one sentence; a longer one is the model rambling instead of describing the task.
MAX_TASK_WORDS = 40


class GeneratedQuery(BaseModel):
    #: One sentence describing the retrieval task, e.g. "Given a scientific claim, retrieve documents that support or
    #: refute it". Generated before the query, as in Gecko, so the query follows from the task.
    task: Annotated[NonEmptyText, at_most_words(MAX_TASK_WORDS)]
    query: Annotated[NonEmptyText, at_most_words(MAX_QUERY_WORDS)]


def _check_fields(fields: Mapping[str, Any]) -> None:
    if fields["query_type"] not in QUERY_TYPES:
        raise ValueError(f"field 'query_type' is {fields['query_type']!r}; supported: {', '.join(QUERY_TYPES)}")


PROMPT = PromptSpec.from_package(
    __name__,
    version="1",
    output_model=GeneratedQuery,
    data_fields=("title", "passage"),
    example_key="query_type",
    # Two examples: enough for a tiny model to copy the format, short enough to leave room for the passage.
    max_examples=2,
    check_fields=_check_fields,
)
