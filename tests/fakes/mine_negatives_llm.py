"""A scripted LLM for the MineNegatives tests, built by `LLMSpec(backend="custom", model=FACTORY)` in DoFn.setup().

Its answers are written into the passage texts, so they need no shared state across Beam workers: `[grade=N]` makes
`negative_scoring` answer relevance N, `[garbage]` makes it answer something that does not parse, `[ql=X]` makes the
query-likelihood score of the passage X (default -50).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pydantic import BaseModel

from pipelines.clients.base import ChatMessage
from tests.fakes.backends import ScriptedLLM

FACTORY = "tests.fakes.mine_negatives_llm:scripted_llm"

_PASSAGE = re.compile(r"<passage>\n(.*?)\n</passage>", re.DOTALL)
_GRADE = re.compile(r"\[grade=(\d)\]")
_LIKELIHOOD = re.compile(r"\[ql=(-?[0-9.]+)\]")


def _passage(messages: Sequence[ChatMessage]) -> str:
    # The last message is the request's user turn; earlier ones are few-shot examples.
    match = _PASSAGE.search(messages[-1].content)
    assert match, f"no <passage> block in {messages[-1].content!r}"
    return match.group(1)


def _respond(messages: Sequence[ChatMessage], output_model: type[BaseModel]) -> str:
    passage = _passage(messages)
    if "[garbage]" in passage:
        return "I think it is quite relevant"
    grade = _GRADE.search(passage)
    return json.dumps({"relevance": int(grade.group(1)) if grade else 0})


def _logprob(messages: Sequence[ChatMessage], continuation: str) -> float:
    match = _LIKELIHOOD.search(_passage(messages))
    return float(match.group(1)) if match else -50.0


def scripted_llm() -> ScriptedLLM:
    return ScriptedLLM(_respond, _logprob)
