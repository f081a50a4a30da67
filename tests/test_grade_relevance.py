from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from data_schemas import GRADED_PAIR, validate_rows
from pipelines.clients.factory import LLMSpec
from pipelines.stages.grade_relevance import GradeRelevance, GradeRelevanceConfig, grade_pair


def _pair(pair_id: str, query: str, passage: str) -> dict:
    return {"pair_id": pair_id, "query_id": pair_id, "query": query, "query_type": "question", "task": "t",
            "passage_id": f"doc-{pair_id}", "passage": passage, "llm_model": "m",
            "prompt_version": "query_generation@1"}


@pytest.mark.parametrize(("rank", "kept"), [(1, True), (3, True), (4, False), (None, False)])
def test_roundtrip_keeps_positives_in_the_teachers_top_k(rank, kept):
    outcome, row = grade_pair(_pair("a", "q", "p"), None, rank, GradeRelevanceConfig(roundtrip_top_k=3))
    assert (outcome == "kept") is kept
    if kept:
        validate_rows([row], GRADED_PAIR)
        assert row["roundtrip_rank"] == rank
    else:
        assert row["reason"] == "roundtrip_failed"
        assert f'"roundtrip_rank": {"null" if rank is None else rank}' in row["payload"]


@pytest.mark.slow
def test_pipeline_with_llm_and_roundtrip_graders():
    pairs = [
        _pair("good", "what is json?", "the json module"),
        _pair("irrelevant", "what is heap?", "the json module"),
        _pair("far", "what is csv?", "the csv module"),  # relevant, but the teacher ranks it 9th
    ]
    ranks = [("good", 1), ("irrelevant", 1), ("far", 9)]
    config = GradeRelevanceConfig(use_llm=True, use_roundtrip=True)
    spec = LLMSpec(backend="custom", model="tests.scripted_backends:grader")
    with TestPipeline() as pipeline:
        outputs = {"pairs": pipeline | "Pairs" >> beam.Create(pairs),
                   "ranks": pipeline | "Ranks" >> beam.Create(ranks)} | GradeRelevance(config, spec)
        evidence = outputs["kept"] | "K" >> beam.Map(lambda r: (r["pair_id"], r["llm_relevance"], r["roundtrip_rank"]))
        assert_that(evidence, equal_to([("good", 3.0, 1)]), label="Kept")
        assert_that(outputs["rejected"] | "R" >> beam.Map(lambda r: (r["record_id"], r["reason"])),
                    equal_to([("irrelevant", "llm_irrelevant"), ("far", "roundtrip_failed")]), label="Rejected")
