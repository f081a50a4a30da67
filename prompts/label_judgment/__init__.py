"""Label judgment: which of a task's labels fits a text? The answer is the label's number in the list.

GenerateCounterfactuals asks it about every generated example and counterfactual when `judge` is "llm" or "both", and
rejects a text whose answer is not the label it was written for (pipelines/stages/label_judge.py). The label list is
the operator's own text and goes inline; the text judged is data and goes in a delimited block.

The answer is a number, not a label name: a task's labels are known only at run time, so no fixed `Literal` can hold
them, while an int with ge/le bounds constrains a local model's decoding to the listed numbers and a Gemini response
schema to the same range. `choice_model(n)` is the output model for an n-label task; its classes are importable by
name (`LabelChoice7`), so requests carrying one pickle for Beam's workers.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated

from pydantic import BaseModel, Field, create_model

from prompts import PromptSpec

#: Most labels one judgment may list. A local model scores every allowed number (MAX_CHOICES in
#: pipelines/clients/json_decoding.py allows 101), and a longer list is more than one prompt should weigh.
MAX_LABELS = 100


class LabelChoice(BaseModel):
    """The answer's shape for any label count; each request uses `choice_model(n)`, bounded to its own n labels."""

    # strict: "2" or 2.0 mean the model ignored the schema, so the answer is not trusted.
    label: Annotated[int, Field(ge=1, le=MAX_LABELS, strict=True)]


@functools.cache
def choice_model(labels: int) -> type[BaseModel]:
    """The output model of a judgment among `labels` labels: {"label": 1..labels}."""
    if not 2 <= labels <= MAX_LABELS:
        raise ValueError(f"a label judgment lists 2..{MAX_LABELS} labels, got {labels}")
    return create_model(
        f"LabelChoice{labels}",
        __base__=LabelChoice,
        __module__=__name__,
        label=(Annotated[int, Field(ge=1, le=labels, strict=True)], ...),
    )


_CHOICE_NAME = re.compile(r"LabelChoice(\d+)")


def __getattr__(name: str):
    # pickle finds a class by module and name: this makes `prompts.label_judgment.LabelChoice7` importable in any
    # process, before or after choice_model(7) was first called there.
    match = _CHOICE_NAME.fullmatch(name)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return choice_model(int(match.group(1)))


def format_labels(labels: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    """The numbered label list the template shows: "1. name: description" a line, in the task spec's order."""
    return "\n".join(f"{number}. {name}: {description}" for number, (name, description) in enumerate(labels, start=1))


PROMPT = PromptSpec.from_package(
    __name__,
    version="1",
    output_model=LabelChoice,
    data_fields=("text",),
    max_examples=1,
)
