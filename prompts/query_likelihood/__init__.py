"""Query likelihood: score mode, not generation. The pipeline scores log p(query | passage) for each mined candidate.

`PROMPT.render(passage=...)` ends with the user turn asking for a search query for the passage; the backend's
`LLM.score(messages, [continuation])` then sums the log-probabilities of the continuation as the assistant's answer,
with `continuation = PROMPT.format_answer({"query": query})`. The answer format is "text": the assistant turn is the
bare query, in the few-shot examples and in the continuation alike, so no JSON punctuation adds to (or varies) the
score. Gecko fuses this ranking with the relevance classification of `negative_scoring` by reciprocal rank fusion.
"""

from __future__ import annotations

from pydantic import BaseModel

from prompts import NonEmptyText, PromptSpec


class SearchQuery(BaseModel):
    query: NonEmptyText


PROMPT = PromptSpec.from_package(
    __name__,
    version="1",
    output_model=SearchQuery,
    data_fields=("passage",),
    max_examples=2,
    answer_format="text",
)
