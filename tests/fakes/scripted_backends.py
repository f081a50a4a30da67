"""Factories for `LLMSpec(backend="custom", model="tests.fakes.scripted_backends:<name>")`: scripted answers, known in
advance, built inside DoFn.setup() like any real backend."""

from __future__ import annotations

import json

from prompts import data_field
from tests.fakes.backends import ScriptedLLM


def _tagged(messages, tag: str) -> str:
    return data_field(messages[-1].content, tag)


def _query_writer(messages, output_model) -> str:
    """Writes "what is <last word of the passage> about" — except for passages that ask to be copied or broken."""
    passage = _tagged(messages, "passage")
    if "BROKEN" in passage:
        return '{"task": "Given a'  # truncated JSON
    if "COPYME" in passage:
        return json.dumps({"task": "Given a question, retrieve passages", "query": passage})
    last_word = passage.split()[-1].strip(".")
    return json.dumps({"task": "Given a question, retrieve passages that answer it", "query": f"what is {last_word}?"})


def query_writer() -> ScriptedLLM:
    return ScriptedLLM(_query_writer)


def _grader(messages, output_model) -> str:
    """Relevance 3 when the query's last word appears in the passage, else 0."""
    query, passage = _tagged(messages, "query"), _tagged(messages, "passage")
    word = query.rstrip("?").split()[-1]
    relevance = 3 if word in passage else 0
    return json.dumps({"reason": f"mentions {word}" if relevance else "unrelated", "relevance": relevance})


def grader() -> ScriptedLLM:
    return ScriptedLLM(_grader)


class _CandidateWriter(ScriptedLLM):
    """Answers like a model sampling candidates: at temperature 0 a query built from the passage's first five words
    (extractive, yet no copy the filters reject); sampled, by the seed's parity, an abstract question about the
    passage's first word (even) or an off-topic question about csv files (odd: it fails the round trip)."""

    def __init__(self):
        super().__init__(lambda messages, output_model: "")

    def answer(self, messages, output_model, config) -> str:
        words = _tagged(messages, "passage").rstrip(".").split()
        if config.temperature == 0:
            query = f"do {' '.join(words[:5])} or not"
        elif config.seed % 2 == 0:
            query = f"what is {words[0]} good for"
        else:
            query = "how do I parse csv files"
        return json.dumps({"task": "Given a question, retrieve passages that answer it", "query": query})


def candidate_writer() -> ScriptedLLM:
    return _CandidateWriter()
