from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from data_schemas import PAIR, REJECTED, validate_rows
from pipelines.clients.base import Usage
from pipelines.clients.factory import LLMSpec
from pipelines.llm_calls import LLMAnswer, LLMRequest
from pipelines.stages.generate_queries import (
    GenerateQueries,
    GenerateQueriesConfig,
    copies_passage,
    few_shot_queries,
    judge_answers,
    query_types_for,
)

SPEC = LLMSpec(backend="custom", model="tests.scripted_backends:query_writer")
PASSAGE = {"passage_id": "p1", "title": None, "text": "The json module encodes Python objects as JSON text.",
           "source": "x", "truncated": False}


def _answer(slot: int, value: dict | None, raw: str = "") -> LLMAnswer:
    request = LLMRequest(request_id=f"p1::q{slot}", prompt_name="query_generation", prompt_version="1", messages=(),
                         context={"passage": PASSAGE, "slot": slot, "query_type": "question"})
    return LLMAnswer(request, value is not None, value, raw, None if value else "invalid JSON", Usage())


@pytest.mark.parametrize(("query", "copied"), [
    ("The json module encodes Python objects as JSON text.", True),  # the whole passage
    ("json module encodes Python objects as JSON", True),  # a verbatim stretch covering the query
    ("how do I turn a dict into JSON?", False),
    ("json encode", False),  # short keyword queries share words by nature
])
def test_copies_passage(query, copied):
    assert copies_passage(query, PASSAGE["text"], GenerateQueriesConfig()) is copied


def test_query_types_rotate_deterministically():
    config = GenerateQueriesConfig(queries_per_passage=3, query_types=("question", "keywords", "claim"))
    types = query_types_for("p1", config)
    assert sorted(types) == ["claim", "keywords", "question"]
    assert types == query_types_for("p1", config)


def test_unknown_query_type_is_a_config_error():
    with pytest.raises(ValueError, match="query type 'haiku' is unknown"):
        GenerateQueriesConfig(query_types=("haiku",))


def test_judge_answers_keeps_good_and_rejects_each_failure_with_reason():
    example_query = next(iter(few_shot_queries()))
    answers = [
        _answer(0, {"task": "Given a question, retrieve", "query": "how do I serialize a dict?"}),
        _answer(1, None, raw='{"task": "Giv'),
        _answer(2, {"task": "Given a question, retrieve", "query": " ".join(example_query)}),
        _answer(3, {"task": "Given a question, retrieve", "query": PASSAGE["text"]}),
        _answer(4, {"task": "Given a question, retrieve", "query": "How do I serialize a dict"}),
    ]
    outcomes = list(judge_answers(answers, GenerateQueriesConfig(), "m"))
    kinds = [(outcome, row.get("reason")) for outcome, row in outcomes]
    assert kinds == [("kept", None), ("rejected", "llm_failed"), ("rejected", "copies_example"),
                     ("rejected", "copies_passage"), ("rejected", "duplicate_query")]
    validate_rows([outcomes[0][1]], PAIR)
    validate_rows([row for outcome, row in outcomes if outcome == "rejected"], REJECTED)
    assert outcomes[1][1]["raw_answer"] == '{"task": "Giv'


@pytest.mark.slow
def test_pipeline_accounts_for_every_slot():
    passages = [
        {**PASSAGE, "passage_id": "a", "text": "Heaps keep the smallest item first."},
        {**PASSAGE, "passage_id": "b", "text": "This passage is BROKEN on purpose."},
        {**PASSAGE, "passage_id": "c", "text": "COPYME please copy this passage verbatim now"},
    ]
    config = GenerateQueriesConfig(queries_per_passage=2)
    with TestPipeline() as pipeline:
        outputs = pipeline | beam.Create(passages) | GenerateQueries(config, SPEC)
        assert_that(outputs["kept"] | "Q" >> beam.Map(lambda row: (row["passage_id"], row["query"])),
                    equal_to([("a", "what is first?")]), label="Kept")
        assert_that(outputs["rejected"] | "R" >> beam.Map(lambda row: (row["record_id"], row["reason"])),
                    equal_to([("a::q1", "duplicate_query"), ("b::q0", "llm_failed"), ("b::q1", "llm_failed"),
                              ("c::q0", "copies_passage"), ("c::q1", "copies_passage")]), label="Rejected")
