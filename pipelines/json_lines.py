"""The one JSON Lines reader: corpora, seed files, few-shot examples and evaluation data are all read through it.

`read_json_lines(path)` streams a file from any Beam filesystem (compressed by suffix: .gz, .bz2, .zst ...) a line at a
time, so a big corpus never sits whole in memory; `parse_json_lines(data)` reads text or bytes already in memory. Both
yield one `JsonLine` per non-blank line: its 1-based number and either the parsed object or the problem with it
(`invalid_utf8`, `invalid_json`, `not_an_object`) in words that name the byte or column. The caller decides whether a
problem rejects the row or stops the read, and how to word where it was.

Lines end at "\\n" only: U+2028 and the other separators `str.splitlines()` breaks on may sit inside a JSON string. A
UTF-8 byte order mark before the first line is dropped. A leaf module: it imports nothing from the project.
"""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"


@dataclass(frozen=True)
class JsonLine:
    """One non-blank line: `value` is its JSON object, unless `problem` says what is wrong (and `detail` in words)."""

    #: 1-based, as in an editor; blank lines count.
    number: int
    #: The line's bytes without its line ending.
    raw: bytes
    #: The decoded JSON value: an object when `problem` is None, any other JSON value for `not_an_object`, else None.
    value: Any = None
    problem: str | None = None
    detail: str = ""

    @property
    def text(self) -> str:
        """The line as text; bytes that are not UTF-8 are shown as backslash escapes."""
        return self.raw.decode("utf-8", "backslashreplace")


def json_type_name(value: Any) -> str:
    """A decoded value's type for messages: "null" for None, else its Python type name (list, str, int)."""
    return "null" if value is None else type(value).__name__


def parse_json_line(number: int, raw: bytes) -> JsonLine:
    """One line (bytes, line ending optional) -> its `JsonLine`."""
    raw = raw.rstrip(b"\r\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return JsonLine(number, raw, problem=INVALID_UTF8,
                        detail=f"not valid UTF-8 (byte {error.start}: {raw[error.start]:#04x})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return JsonLine(number, raw, problem=INVALID_JSON,
                        detail=f"not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(value, dict):
        return JsonLine(number, raw, value, NOT_AN_OBJECT, f"expected a JSON object, got {json_type_name(value)}")
    return JsonLine(number, raw, value)


def _json_lines(raw_lines: Iterable[bytes]) -> Iterator[JsonLine]:
    for number, raw in enumerate(raw_lines, 1):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if raw.strip():
            yield parse_json_line(number, raw)


def parse_json_lines(data: str | bytes) -> Iterator[JsonLine]:
    """The lines of a JSON Lines text (or its bytes) in memory."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return _json_lines(io.BytesIO(raw))


def read_json_lines(path: str) -> Iterator[JsonLine]:
    """Stream the lines of a JSON Lines file on any Beam filesystem. Errors opening or reading the file propagate."""
    # Imported here: Beam's filesystems take over a second to import, and text callers (prompts) need none of it.
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:  # AUTO compression: .gz, .bz2, .zst ... by suffix
        yield from _json_lines(iter(handle.readline, b""))
