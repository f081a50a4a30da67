"""How `LocalLLM` decodes an output model as JSON, in pure functions tested without a model: a plan per field (free
text, a choice among JSON values, a list of free texts) and the text pieces the answer is assembled from.

`LocalLLM` (pipelines/clients/local_llm.py) writes the JSON skeleton itself and asks the model only for the values;
what the skeleton is, and how generated string content is read back, lives here.
"""

from __future__ import annotations

import enum
import json
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel

#: Items a `list[str]` field may get when its model sets no max_length: enough for keywords or sub-queries, few
#: enough that a small model stuck in a loop ends quickly.
DEFAULT_MAX_LIST_ITEMS = 8
#: Most allowed values a choice field may have: each is scored, so `int` ranges must stay small (a 1-5 grade).
MAX_CHOICES = 101


@dataclass(frozen=True)
class FieldPlan:
    """How one field of the output model is decoded."""

    #: The JSON key (the field's alias when it has one, as pydantic validates by alias).
    key: str
    kind: Literal["string", "choice", "string_list"]
    #: choice: each allowed value as JSON text (`"relevant"`, `3`, `true`), in declaration order.
    choices: tuple[str, ...] = ()
    min_items: int = 0
    max_items: int = DEFAULT_MAX_LIST_ITEMS


def _unannotated(annotation: Any) -> Any:
    """`Annotated[str, validator]` -> str: item validators (e.g. prompts.NonEmptyText) run when the answer is parsed."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation


def plan_fields(output_model: type[BaseModel]) -> tuple[FieldPlan, ...]:
    """One `FieldPlan` per field, in declaration order; TypeError for a field constrained decoding cannot produce."""
    plans = []
    for name, info in output_model.model_fields.items():
        key = info.alias or name
        annotation = info.annotation
        where = f"{output_model.__name__}.{name}"
        if annotation is str:
            plans.append(FieldPlan(key, "string"))
        elif annotation is bool:
            plans.append(FieldPlan(key, "choice", ("true", "false")))
        elif annotation is int:
            low, high = _int_bounds(info.metadata, where)
            if high - low + 1 > MAX_CHOICES:
                raise TypeError(
                    f"{where}: {high - low + 1} allowed values; constrained decoding scores at most "
                    f"{MAX_CHOICES}, narrow the ge/le bounds"
                )
            plans.append(FieldPlan(key, "choice", tuple(str(value) for value in range(low, high + 1))))
        elif typing.get_origin(annotation) is Literal:
            plans.append(FieldPlan(key, "choice", _json_choices(typing.get_args(annotation), where)))
        elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            plans.append(FieldPlan(key, "choice", _json_choices([member.value for member in annotation], where)))
        elif typing.get_origin(annotation) is list and tuple(map(_unannotated, typing.get_args(annotation))) == (str,):
            min_items = max((m.min_length for m in info.metadata if isinstance(m, annotated_types.MinLen)), default=0)
            declared_max = [m.max_length for m in info.metadata if isinstance(m, annotated_types.MaxLen)]
            max_items = min(declared_max) if declared_max else DEFAULT_MAX_LIST_ITEMS
            plans.append(FieldPlan(key, "string_list", min_items=min_items, max_items=max(max_items, min_items)))
        else:
            raise TypeError(
                f"{where}: {annotation!r} is not supported by LocalLLM's constrained decoding; use str, bool, "
                f"int with ge/le bounds, Literal[...], an Enum or list[str]"
            )
    if not plans:
        raise TypeError(f"{output_model.__name__} has no fields to generate")
    return tuple(plans)


def _int_bounds(metadata: Sequence[Any], where: str) -> tuple[int, int]:
    low = high = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = int(item.ge)
        elif isinstance(item, annotated_types.Gt):
            low = int(item.gt) + 1
        elif isinstance(item, annotated_types.Le):
            high = int(item.le)
        elif isinstance(item, annotated_types.Lt):
            high = int(item.lt) - 1
    if low is None or high is None:
        raise TypeError(f"{where}: an int field needs both bounds (Field(ge=..., le=...)) so its value can be chosen")
    if low > high:
        raise TypeError(f"{where}: empty range {low}..{high}")
    return low, high


def _json_choices(values: Sequence[Any], where: str) -> tuple[str, ...]:
    if not values or not all(isinstance(value, str | int | bool) for value in values):
        raise TypeError(f"{where}: choices must be str, int or bool values, got {list(values)!r}")
    if len(values) > MAX_CHOICES:
        raise TypeError(f"{where}: {len(values)} choices; constrained decoding scores at most {MAX_CHOICES}")
    return tuple(json.dumps(value, ensure_ascii=False) for value in values)


def key_text(index: int, key: str) -> str:
    """The skeleton before field `index`'s value: `{"key":` for the first field, `, "key":` after."""
    return ("{" if index == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ":"


def find_string_end(text: str) -> int | None:
    """Index of the first unescaped `"` or raw newline in generated string content, or None if it is still open.

    A raw newline ends the string because a JSON string cannot contain one, and small models use it to start rambling.
    """
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in '"\n':
            return index
    return None


_JSON_ESCAPE = re.compile(r'\\(["\\/bfnrt]|u[0-9a-fA-F]{4})|\\')


def decode_string_content(content: str) -> str:
    """Generated string content (JSON-escaped as the model wrote it) -> the Python string.

    Invalid escapes (a lone backslash, `\\x`) are kept as literal text rather than failing the whole answer.
    """
    # strict=False: a raw tab or other control character is kept rather than rejected.
    decoder = json.JSONDecoder(strict=False)
    try:
        return decoder.decode(f'"{content}"')
    except json.JSONDecodeError:
        # Double every backslash that does not start a valid JSON escape, then decode again. Valid escapes are
        # matched whole, so the second half of an escaped backslash is never taken for the start of another escape.
        repaired = _JSON_ESCAPE.sub(lambda match: match.group(0) if match.group(1) else "\\\\", content)
        try:
            return decoder.decode(f'"{repaired}"')
        except json.JSONDecodeError:
            return content


def list_text(items: Sequence[str]) -> str:
    """A JSON array from already JSON-encoded items, spaced as `json.dumps` spaces it."""
    return "[" + ", ".join(items) + "]"
