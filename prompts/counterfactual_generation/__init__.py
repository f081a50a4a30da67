"""Counterfactual classification examples: minimally edit a seed text so that it belongs to a target label.

Pairs that differ in a few words but not in label teach the student what the label depends on. The label spec is the
operator's own text and goes inline; the seed text is data and goes in a delimited block. The stage rejects answers
identical to the seed text.
"""

from __future__ import annotations

from pydantic import BaseModel

from prompts import NonEmptyText, PromptSpec


class Counterfactual(BaseModel):
    text: NonEmptyText


PROMPT = PromptSpec.from_package(
    __name__,
    version="1",
    output_model=Counterfactual,
    data_fields=("text",),
    max_examples=1,
)
