"""Gecko-style query generation: a passage and a query type in, a retrieval task description and a query out.

Few-shot examples matter here: measured on this machine, a tiny local LLM (SmolLM2-135M) writes plausible queries only
with them, and zero-shot it echoes the passage. So `render` shows the examples of the requested query type, and they
are kept short.

A user may replace them with examples from their own domain (Promptagator): `parse_user_examples` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from pipelines.json_lines import parse_json_lines
from prompts import FewShotExample, NonEmptyText, PromptSpec, at_most_words

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


# --- A user's own examples --------------------------------------------------------------------------------------------

#: Promptagator adapts retrieval to a domain from 2 to 8 of its (passage, query) examples; a request shows
#: PROMPT.max_examples of them, so more would only be a longer file.
MAX_USER_EXAMPLES = 8
#: The task a user's example shows when its line names none: the retrieval task its query type implies.
DEFAULT_TASKS: dict[str, str] = {
    "question": "Given a question, retrieve passages that answer it",
    "keywords": "Given search keywords, retrieve relevant passages",
    "claim": "Given a claim, retrieve passages that support or refute it",
    "title": "Given a title, retrieve the passage it heads",
}
_REQUIRED = ("passage", "query")
_OPTIONAL = ("title", "query_type", "task")


def _text_field(row: Mapping[str, Any], name: str, where: str, *, required: bool) -> str:
    value = row.get(name)
    if value is None and not required:
        return ""
    if name not in row:
        raise ValueError(f"{where}: missing field {name!r}")
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def parse_user_examples(data: str | bytes) -> tuple[FewShotExample, ...]:
    """A user's few-shot examples, one JSON object a line: `passage` and `query`, optionally `title`, `query_type`
    (default "question") and `task` (default: DEFAULT_TASKS for the type). Blank lines are skipped.

    Raises ValueError naming the line and field, e.g. `line 3: missing field 'query'`.
    """
    examples = []
    for line in parse_json_lines(data):
        where = f"line {line.number}"
        if len(examples) == MAX_USER_EXAMPLES:
            raise ValueError(f"{where}: more than {MAX_USER_EXAMPLES} examples (a request shows {PROMPT.max_examples})")
        if line.problem is not None:
            raise ValueError(f"{where}: {line.detail}")
        row = line.value
        unknown = sorted(set(row) - {*_REQUIRED, *_OPTIONAL})
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join((*_REQUIRED, *_OPTIONAL))})")
        passage, query = (_text_field(row, name, where, required=True) for name in _REQUIRED)
        title = _text_field(row, "title", where, required=False)
        query_type = _text_field(row, "query_type", where, required=False) or "question"
        if query_type not in QUERY_TYPES:
            raise ValueError(f"{where}: field 'query_type' is {query_type!r}; supported: {', '.join(QUERY_TYPES)}")
        task = _text_field(row, "task", where, required=False) or DEFAULT_TASKS[query_type]
        try:
            answer = PROMPT.format_answer({"task": task, "query": query})
        except ValidationError as error:
            problem = error.errors()[0]
            raise ValueError(f"{where}: field {problem['loc'][0]!r}: {problem['msg']}") from None
        examples.append(FewShotExample(inputs=(("title", title), ("passage", passage), ("query_type", query_type)),
                                       answer=answer))
    if not examples:
        raise ValueError("holds no examples (one JSON object a line)")
    return tuple(examples)
