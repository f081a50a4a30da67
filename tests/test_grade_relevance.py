from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from data_schemas import GRADED_PAIR, REJECTED, validate_rows
from pipelines.clients.base import TaskType, Usage
from pipelines.clients.specs import LLMSpec
from pipelines.llm_calls import LLMAnswer, LLMRequest
from pipelines.model_access import ModelAccess
from pipelines.stages.grade_relevance import (
    GradeRelevance,
    GradeRelevanceConfig,
    _GradeFn,
    _SelectFn,
    grade_pair,
    positive_rank,
    select_candidate,
)
from tests.dofn_lifecycle import run_dofn

JSON_PASSAGE = "The json module encodes Python objects as JSON text."


def _pair(pair_id: str, query: str, passage: str, query_id: str | None = None) -> dict:
    return {"pair_id": pair_id, "query_id": query_id or pair_id, "query": query, "query_type": "question", "task": "t",
            "passage_id": f"doc-{pair_id}", "passage": passage, "llm_model": "m",
            "prompt_version": "query_generation@1"}


def _graded(pair_id: str, query: str) -> dict:
    """A graded candidate of slot p::q0 (its pair_id is p::q0 for the first candidate, p::q0c<k> for the others)."""
    return {**_pair(pair_id, query, JSON_PASSAGE, query_id="p::q0"), "llm_relevance": None, "llm_reason": None,
            "roundtrip_rank": 1}


def _teacher_vectors(ranks: dict[str, int | None], top_k: int) -> list[dict]:
    """Teacher vectors under which the round trip ranks each pair's positive (`doc-<pair_id>`) at the given rank (None:
    just outside the top `top_k`): each query has a dimension of its own, and passages ahead of its positive lie on
    it."""
    vectors = []
    for index, (pair_id, rank) in enumerate(ranks.items()):
        def along(length: float, index: int = index) -> list[float]:
            return [length if dimension == index else 0.0 for dimension in range(len(ranks))]

        vectors.append({"id": pair_id, "task_type": TaskType.RETRIEVAL_QUERY.value, "embedding": along(1.0)})
        vectors.append({"id": f"doc-{pair_id}", "task_type": TaskType.RETRIEVAL_DOCUMENT.value,
                        "embedding": along(0.5)})
        vectors += [{"id": f"ahead-{pair_id}-{ahead}", "task_type": TaskType.RETRIEVAL_DOCUMENT.value,
                     "embedding": along(0.9 - ahead / 100)} for ahead in range(top_k if rank is None else rank - 1)]
    return vectors


def test_positive_rank_is_the_positives_place_among_the_hits_or_none():
    hits = [("doc-b", 0.9), ("doc-a", 0.5)]
    assert list(positive_rank(("a", {"hits": [hits], "pairs": ["doc-a"]}))) == [("a", 2)]
    assert list(positive_rank(("a", {"hits": [hits], "pairs": ["doc-c"]}))) == [("a", None)]
    assert list(positive_rank(("a", {"hits": [], "pairs": ["doc-a"]}))) == [("a", None)]
    assert list(positive_rank(("a", {"hits": [hits], "pairs": []}))) == []


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
        _pair("far", "what is csv?", "the csv module"),  # relevant, but outside the teacher's top 3
    ]
    config = GradeRelevanceConfig(use_llm=True, use_roundtrip=True)
    vectors = _teacher_vectors({"good": 1, "irrelevant": 1, "far": None}, config.roundtrip_top_k)
    spec = LLMSpec(backend="custom", model="tests.fakes.scripted_backends:grader")
    with TestPipeline() as pipeline:
        outputs = {"pairs": pipeline | "Pairs" >> beam.Create(pairs),
                   "vectors": pipeline | "Vectors" >> beam.Create(vectors)} | GradeRelevance(
            config, ModelAccess.llm(spec))
        evidence = outputs["kept"] | "K" >> beam.Map(lambda r: (r["pair_id"], r["llm_relevance"], r["roundtrip_rank"]))
        assert_that(evidence, equal_to([("good", 3.0, 1)]), label="Kept")
        assert_that(outputs["rejected"] | "R" >> beam.Map(lambda r: (r["record_id"], r["reason"])),
                    equal_to([("irrelevant", "llm_irrelevant"), ("far", "roundtrip_failed")]), label="Rejected")


@pytest.mark.parametrize(("candidates", "kept"), [
    # json module encodes python objects: 4 of 4 word pairs copied; what does the json module do: 2 of 5; how do I
    # turn a dict into text: none.
    ([("p::q0", "json module encodes Python objects"), ("p::q0c1", "how do I turn a dict into text?"),
      ("p::q0c2", "what does the json module do?")], "p::q0c1"),
    ([("p::q0c2", "what does the json module do?"), ("p::q0", "json module encodes Python objects")], "p::q0c2"),
    # A tie goes to the earlier candidate (the first one is asked at temperature 0); c10 comes after c2.
    ([("p::q0c10", "how do I turn a dict into text?"), ("p::q0c2", "which format do web APIs speak?"),
      ("p::q0c3", "how can I save settings to a file?")], "p::q0c2"),
    ([("p::q0", "json module encodes Python objects")], "p::q0"),  # one candidate: nothing to choose
])
def test_select_candidate_keeps_the_least_extractive_and_rejects_the_rest_as_surplus(candidates, kept):
    outcomes = list(select_candidate(_graded(pair_id, query) for pair_id, query in candidates))
    assert outcomes[0] == ("kept", next(row for row in (_graded(*c) for c in candidates) if row["pair_id"] == kept))
    rejected = [row for outcome, row in outcomes[1:]]
    assert [outcome for outcome, _ in outcomes[1:]] == ["rejected"] * (len(candidates) - 1)
    assert sorted(row["record_id"] for row in rejected) == sorted(p for p, _ in candidates if p != kept)
    assert all(row["reason"] == "surplus_candidate" and kept in row["detail"] for row in rejected)
    validate_rows(rejected, REJECTED)


def test_select_candidate_of_nothing_is_nothing():
    assert list(select_candidate([])) == []


@pytest.mark.slow
def test_pipeline_selects_one_candidate_per_slot_among_those_that_passed():
    pairs = [
        _pair("a::q0", "json module encodes Python objects", JSON_PASSAGE, query_id="a::q0"),
        _pair("a::q0c1", "how do I turn a dict into text?", JSON_PASSAGE, query_id="a::q0"),  # least extractive
        _pair("a::q0c2", "what does the json module do?", JSON_PASSAGE, query_id="a::q0"),
        _pair("b::q0", "json module encodes Python objects", JSON_PASSAGE, query_id="b::q0"),
        _pair("b::q0c1", "how do I turn a dict into text?", JSON_PASSAGE, query_id="b::q0"),  # fails the round trip
    ]
    ranks = {"a::q0": 1, "a::q0c1": 2, "a::q0c2": 1, "b::q0": 2, "b::q0c1": None}
    vectors = _teacher_vectors(ranks, GradeRelevanceConfig().roundtrip_top_k)
    with TestPipeline() as pipeline:
        outputs = {"pairs": pipeline | "Pairs" >> beam.Create(pairs),
                   "vectors": pipeline | "Vectors" >> beam.Create(vectors)} | GradeRelevance(
            GradeRelevanceConfig(), select_candidates=True)
        assert_that(outputs["kept"] | "K" >> beam.Map(lambda r: (r["query_id"], r["pair_id"], r["roundtrip_rank"])),
                    equal_to([("a::q0", "a::q0c1", 2), ("b::q0", "b::q0", 2)]), label="Kept")
        assert_that(outputs["rejected"] | "R" >> beam.Map(lambda r: (r["record_id"], r["reason"])),
                    equal_to([("a::q0", "surplus_candidate"), ("a::q0c2", "surplus_candidate"),
                              ("b::q0c1", "roundtrip_failed")]), label="Rejected")


# --- the DoFns, called directly -------------------------------------------------------------------------------------


def _grading(pair_id: str, relevance: int | None) -> LLMAnswer:
    """The grader's answer for `pair_id`: a relevance, or (None) an answer that failed to parse."""
    request = LLMRequest(request_id=pair_id, prompt_name="relevance_grading", prompt_version="1", messages=(),
                         context=pair_id)
    if relevance is None:
        return LLMAnswer(request, False, None, '{"relev', "invalid JSON", Usage())
    return LLMAnswer(request, True, {"relevance": relevance, "reason": "r"}, "{}", None, Usage())


def test_grade_fn_grades_each_joined_pair_and_tags_each_rejection_with_its_reason():
    def joined(pair_id: str, relevance: int | None, rank: int | None, pair: bool = True):
        return pair_id, {"pairs": [_pair(pair_id, "q", "p")] if pair else [], "answers": [_grading(pair_id, relevance)],
                         "ranks": [rank]}

    elements = [joined("good", 3, 1), joined("irrelevant", 1, 1), joined("broken", None, 1), joined("far", 3, 4),
                joined("orphan", 3, 1, pair=False)]  # evidence about no pair: nothing comes out
    outputs = run_dofn(_GradeFn(GradeRelevanceConfig(use_llm=True, use_roundtrip=True)), elements)
    assert [(row["pair_id"], row["llm_relevance"], row["roundtrip_rank"]) for row in outputs.main] == [
        ("good", 3.0, 1)]
    validate_rows(outputs.main, GRADED_PAIR)
    assert [(row["record_id"], row["reason"]) for row in outputs.tagged["rejected"]] == [
        ("irrelevant", "llm_irrelevant"), ("broken", "llm_grading_failed"), ("far", "roundtrip_failed")]
    assert outputs.tagged["rejected"][1]["raw_answer"] == '{"relev'  # a failed parse keeps the raw answer
    validate_rows(outputs.tagged["rejected"], REJECTED)
    assert outputs.tallies == {}  # kept and rejected rows are counted as they leave the stage (CountRows)


def test_select_fn_keeps_one_candidate_per_slot_and_tags_the_rest_surplus():
    slot = [_graded("p::q0", "json module encodes Python objects"),
            _graded("p::q0c1", "how do I turn a dict into text?")]
    outputs = run_dofn(_SelectFn(), [("p::q0", slot), ("empty", [])])
    assert [row["pair_id"] for row in outputs.main] == ["p::q0c1"]
    assert [(row["record_id"], row["reason"]) for row in outputs.tagged["rejected"]] == [
        ("p::q0", "surplus_candidate")]
