"""New classification examples for one label, from the task description, the label's description and seed examples.

The label spec (task, label, description) is the operator's own text and goes inline as instructions; the seed
examples are data and go in a delimited block. The stage de-duplicates the answers against the seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, Field

from prompts import NonEmptyText, PromptSpec

# 20 per call: more makes the model repeat itself and risks an answer cut off at the output-token limit.
MAX_EXAMPLES = 20


class GeneratedExamples(BaseModel):
    examples: Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_EXAMPLES)]


def _check_fields(fields: Mapping[str, Any]) -> None:
    count = fields["count"]
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_EXAMPLES:
        raise ValueError(f"field 'count' must be an int in 1..{MAX_EXAMPLES}, got {count!r}")


PROMPT = PromptSpec.from_package(
    __name__,
    version="1",
    output_model=GeneratedExamples,
    data_fields=("seed_examples",),
    max_examples=1,
    check_fields=_check_fields,
)
