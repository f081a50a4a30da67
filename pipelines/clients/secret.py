"""`Secret`: an API key held so that it cannot leak through a repr, a str, a vars() dump of its owner or pickling.

Shared by the API backends (pipelines/clients/gemini.py, openai_compatible.py); keys come only from the environment
and live in a `Secret` from the moment they are read.
"""

from __future__ import annotations

from typing import Any


class Secret:
    __slots__ = ("_value", "_name")

    def __init__(self, value: str, name: str):
        self._value = value
        #: What the value is, for the pickling error ("the Gemini API key").
        self._name = name

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        return text.replace(self._value, "[redacted]") if self._value else text

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError(f"{self._name} does not pickle: build API clients in DoFn.setup(), from a spec")
