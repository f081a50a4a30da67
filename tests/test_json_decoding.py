"""How LocalLLM plans an output model's JSON, without a model: one plan per field, and the skeleton pieces and string
decoding the answer is assembled from (pipelines/clients/json_decoding.py). The decoding itself, with the packaged
model, is tested in test_local_models.py.
"""

from __future__ import annotations

import enum
import json
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from pipelines.clients.json_decoding import (
    DEFAULT_MAX_LIST_ITEMS,
    FieldPlan,
    decode_string_content,
    find_string_end,
    key_text,
    list_text,
    plan_fields,
)
from prompts import get_prompt


class Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


class Everything(BaseModel):
    task: str
    query: str = Field(min_length=1)
    label: Literal["relevant", "not relevant"]
    grade: int = Field(ge=1, le=5)
    strict_grade: int = Field(gt=0, lt=4)
    keywords: list[str] = Field(min_length=1, max_length=3)
    notes: list[str]
    flag: bool
    color: Color
    aliased: str = Field(alias="query_text")


def test_list_items_with_validators_decode_as_strings():
    # The example_generation prompt's answer: list items carry a validator (prompts.NonEmptyText).
    plans = plan_fields(get_prompt("example_generation").output_model)
    assert [(plan.key, plan.kind) for plan in plans] == [("examples", "string_list")]


def test_plan_fields_keeps_declaration_order_and_encodes_choices_as_json():
    plans = plan_fields(Everything)
    assert [plan.key for plan in plans] == [
        "task", "query", "label", "grade", "strict_grade", "keywords", "notes", "flag", "color", "query_text",
    ]  # fmt: skip
    by_key = {plan.key: plan for plan in plans}
    assert by_key["task"] == FieldPlan("task", "string")
    assert by_key["label"].choices == ('"relevant"', '"not relevant"')
    assert by_key["grade"].choices == ("1", "2", "3", "4", "5")
    assert by_key["strict_grade"].choices == ("1", "2", "3")
    assert by_key["flag"].choices == ("true", "false")
    assert by_key["color"].choices == ('"red"', '"blue"')
    assert (by_key["keywords"].min_items, by_key["keywords"].max_items) == (1, 3)
    assert (by_key["notes"].min_items, by_key["notes"].max_items) == (0, DEFAULT_MAX_LIST_ITEMS)


class Unbounded(BaseModel):
    grade: int = Field(ge=0)


class HugeRange(BaseModel):
    grade: int = Field(ge=0, le=10_000)


class Floaty(BaseModel):
    score: float


class Optional_(BaseModel):
    query: str | None


class Nested(BaseModel):
    inner: Floaty


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (Unbounded, "needs both bounds"),
        (HugeRange, "narrow the ge/le bounds"),
        (Floaty, "not supported"),
        (Optional_, "not supported"),
        (Nested, "not supported"),
    ],
)
def test_plan_fields_rejects_what_it_cannot_decode(model, message):
    with pytest.raises(TypeError, match=message) as raised:
        plan_fields(model)
    assert model.__name__ in str(raised.value)  # the error names the field's model


def test_skeleton_pieces_assemble_exactly_json_dumps():
    """The decoder writes key_text + " " + JSON value per field, then "}": that must be json.dumps, byte for byte."""
    values = {"task": 'say "hi"\\ now', "label": "relevant", "grade": 3, "keywords": ["a", 'b "c"'], "flag": True}
    pieces = []
    for index, (key, value) in enumerate(values.items()):
        pieces.append(key_text(index, key))
        encoded = list_text([json.dumps(item) for item in value]) if isinstance(value, list) else json.dumps(value)
        pieces.append(" " + encoded)
    assert "".join(pieces) + "}" == json.dumps(values)
    assert list_text([]) == json.dumps([])


@pytest.mark.parametrize(
    ("generated", "end"),
    [
        ('python json parser", "next', 18),
        ('say \\"hi\\" now"', 14),  # escaped quotes stay inside
        ('ends in backslash \\\\"', 20),  # an escaped backslash does not escape the quote after it
        ("first line\nsecond line", 10),  # a raw newline cannot be in a JSON string: it ends the value
        ("still open", None),
        ("", None),
    ],
)
def test_find_string_end(generated, end):
    assert find_string_end(generated) == end


@pytest.mark.parametrize(
    ("content", "value"),
    [
        ("plain", "plain"),
        ('say \\"hi\\"', 'say "hi"'),
        ("tab\\there \\u00e9", "tab\there é"),
        ("C:\\path\\x", "C:\\path\\x"),  # invalid escape kept as text
        ("trailing backslash \\", "trailing backslash \\"),
        ("escaped \\\\x then bad \\q", "escaped \\x then bad \\q"),
        ("raw\ttab", "raw\ttab"),  # a raw control character is kept, and json.dumps escapes it again
    ],
)
def test_decode_string_content_is_lenient_and_reencodes_to_valid_json(content, value):
    decoded = decode_string_content(content)
    assert decoded == value
    assert json.loads(json.dumps(decoded)) == value
