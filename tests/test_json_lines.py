"""The one JSON Lines reader (pipelines/json_lines.py): line numbers, blank lines, BOM, and each problem in words."""

from __future__ import annotations

import gzip
import json

import pytest

from pipelines.json_lines import (
    INVALID_JSON,
    INVALID_UTF8,
    NOT_AN_OBJECT,
    JsonLine,
    parse_json_line,
    parse_json_lines,
    read_json_lines,
)

TEXT = (
    '\ufeff{"id": 1}\n'  # a byte order mark before the first line is not part of it
    "\n"
    "   \r\n"  # blank lines are no rows, but count for the numbering
    '{"text": "one\u2028line\u2029still"}\r\n'  # separators str.splitlines() breaks on, inside a JSON string
    '{"id": \n'
    "[1, 2]\n"
    '{"id": 3}'  # no line ending at the end of the file
)


def _summary(lines: list[JsonLine]) -> list[tuple[int, object, str | None]]:
    return [(line.number, line.value, line.problem) for line in lines]


EXPECTED = [
    (1, {"id": 1}, None),
    (4, {"text": "one\u2028line\u2029still"}, None),
    (5, None, INVALID_JSON),
    (6, [1, 2], NOT_AN_OBJECT),
    (7, {"id": 3}, None),
]


@pytest.mark.parametrize("data", [TEXT, TEXT.encode("utf-8")], ids=["text", "bytes"])
def test_parse_numbers_lines_keeps_separators_inside_strings_and_drops_the_bom(data):
    assert _summary(list(parse_json_lines(data))) == EXPECTED


@pytest.mark.parametrize("name, opener", [("rows.jsonl", open), ("rows.jsonl.gz", gzip.open)])
def test_read_streams_a_file_plain_or_compressed(tmp_path, name, opener):
    path = tmp_path / name
    with opener(path, "wb") as handle:
        handle.write(TEXT.encode("utf-8"))
    assert _summary(list(read_json_lines(str(path)))) == EXPECTED


def test_a_bom_is_dropped_only_before_the_first_line():
    [line] = parse_json_lines(b'\n\xef\xbb\xbf{"id": 1}\n')
    assert (line.number, line.problem) == (2, INVALID_JSON)


@pytest.mark.parametrize("raw, problem, detail", [
    (b'{"text": "caf\xe9"}\n', INVALID_UTF8, "not valid UTF-8 (byte 13: 0xe9)"),
    (b'{"text": \n', INVALID_JSON, "not valid JSON (Expecting value at column 10)"),
    (b"{'text': 'x'}", INVALID_JSON, "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    (b"[1, 2]\n", NOT_AN_OBJECT, "expected a JSON object, got list"),
    (b'"a string"\n', NOT_AN_OBJECT, "expected a JSON object, got str"),
    (b"null\n", NOT_AN_OBJECT, "expected a JSON object, got null"),
])
def test_each_problem_is_named_precisely(raw, problem, detail):
    line = parse_json_line(9, raw)
    assert (line.number, line.problem, line.detail) == (9, problem, detail)


def test_a_bad_line_keeps_its_bytes_without_the_line_ending():
    line = parse_json_line(1, b'{"text": "\xff"}\r\n')
    assert line.raw == b'{"text": "\xff"}'
    assert line.text == '{"text": "\\xff"}'
    assert line.value is None


def test_a_good_line_is_the_parsed_object():
    line = parse_json_line(3, json.dumps({"a": [1, {"b": None}]}).encode())
    assert (line.value, line.problem, line.detail) == ({"a": [1, {"b": None}]}, None, "")
