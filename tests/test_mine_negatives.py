"""Stage 5, MineNegatives: pure functions, the search DoFn called directly, and the PTransform on TestPipeline."""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from data_schemas import REJECTED, TRIPLET, validate_rows
from pipelines.clients.base import Usage
from pipelines.clients.specs import LLMSpec
from pipelines.llm_calls import LLMAnswer
from pipelines.model_access import ModelAccess, ModelIdentity
from pipelines.sharded_search import pack_vector, teacher_score
from pipelines.stages import rejected_row
from pipelines.stages.candidate_scoring import (
    RRF_K,
    LLMJudgement,
    build_llm_requests,
    decide_relabel,
    fuse_llm_scores,
    read_judgement,
)
from pipelines.stages.mine_negatives import (
    STAGE,
    Candidate,
    MineNegatives,
    MineNegativesConfig,
    _JudgeFn,
    _KeyQueriesFn,
    _MineEmbedded,
    _SelectFn,
    build_triplet,
    judge_candidates,
    mine_without_llm,
    rejected_payload,
    select_candidates,
)
from tests.dofn_lifecycle import run_dofn
from tests.fakes.mine_negatives_llm import FACTORY
from tests.test_sharded_search import brute_force_top_k, normalized_vectors

TEACHER = "test-teacher"


def _config(**overrides: Any) -> MineNegativesConfig:
    # One faiss thread: the test machine's cores are shared.
    return MineNegativesConfig(**{"teacher_model": TEACHER, "faiss_threads": 1, **overrides})


# --- Config -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"k": 0}, "k must be >= 1"),
        ({"k": 5, "num_negatives": 5}, "num_negatives must be in 1..k-1 = 1..4"),
        ({"max_negative_score_ratio": 0.0}, "max_negative_score_ratio must be in (0, 1]"),
        ({"max_negative_score_ratio": 1.5}, "max_negative_score_ratio must be in (0, 1]"),
        ({"shard_size": 0}, "shard_size must be >= 1"),
        ({"min_negatives": 8}, "min_negatives must be in 0..num_negatives"),
        ({"query_likelihood": True}, "set llm_scoring=True"),
        ({"llm_scoring": True, "llm_candidates": 3}, "llm_candidates must be in num_negatives..k-1 = 7..31"),
        ({"index": "IVF16,Flta"}, "index 'IVF16,Flta' is not a faiss index factory string"),
        ({"nprobe": 4}, "nprobe applies to an IVF index"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _config(**overrides)


def test_transform_needs_a_teacher_name_an_llm_spec_for_llm_scoring_and_logprobs_for_query_likelihood() -> None:
    with pytest.raises(ValueError, match="teacher_model is empty"):
        MineNegatives(MineNegativesConfig())
    with pytest.raises(ValueError, match="needs an LLM"):
        MineNegatives(_config(llm_scoring=True), None)
    with pytest.raises(ValueError, match="log-probabilities"):
        MineNegatives(_config(llm_scoring=True, query_likelihood=True), ModelAccess.llm(LLMSpec(backend="gemini")))
    # The run's teacher names the triplets' model when the config does not.
    assert MineNegatives(MineNegativesConfig(), teacher=ModelIdentity("teacher", "v1"))._config.teacher_model == (
        "teacher@v1")


# --- Selection and triplets -------------------------------------------------------------------------------------------


def _candidate(passage_id: str, score: float, text: str | None = None) -> Candidate:
    return Candidate(passage_id, text or f"text of {passage_id}", score, None)


def test_select_candidates_drops_positive_text_duplicates_and_near_duplicates_and_orders_hardest_first() -> None:
    hits = [
        _candidate("neg-b", 0.70),
        _candidate("pos", 0.90, "The positive."),
        _candidate("near-dup", 0.88),  # 0.88 > 0.95 x 0.90 = 0.855: a false negative
        _candidate("same-text", 0.40, "  the POSITIVE. "),
        _candidate("neg-a", 0.70),
        _candidate("at-threshold", 0.95 * 0.90),
        _candidate("neg-c", 0.10),
    ]
    selection = select_candidates("pos", "The positive.", 0.90, hits, _config())
    assert [c.passage_id for c in selection.candidates] == ["at-threshold", "neg-a", "neg-b", "neg-c"]
    assert selection.dropped_positive == 1
    assert selection.dropped_duplicates == ("same-text",)
    assert selection.dropped_false_negatives == ("near-dup",)
    keep_duplicates = select_candidates(
        "pos", "The positive.", 0.90, hits, _config(drop_positive_text_duplicates=False)
    )
    assert "same-text" in [c.passage_id for c in keep_duplicates.candidates]


def test_select_candidates_keeps_the_margin_below_a_negative_positive_score() -> None:
    hits = [_candidate("a", -0.19), _candidate("b", -0.205), _candidate("c", -0.3)]
    selection = select_candidates("pos", "p", -0.2, hits, _config())
    assert selection.max_negative_score == pytest.approx(-0.21)
    assert [c.passage_id for c in selection.candidates] == ["c"]


def _row(pair_id: str = "pair-1", **overrides: Any) -> dict[str, Any]:
    row = {
        "pair_id": pair_id, "query_id": f"q-{pair_id}", "query": "what is x?", "query_type": "question",
        "task": "Given a question, retrieve passages that answer it", "passage_id": "pos", "passage": "x is y.",
        "llm_model": "m", "prompt_version": "1", "llm_relevance": None, "llm_reason": None, "roundtrip_rank": 1,
        "query_embedding": [1.0, 0.0], "positive_embedding": [0.6, 0.8],
    }
    return {**row, **overrides}


def test_mine_without_llm_keeps_the_hardest_and_rejects_when_none_survive() -> None:
    config = _config(k=4, num_negatives=2)
    row = _row()
    candidates = [Candidate(f"n{i}", f"neg {i}", 0.5 - i / 10, pack_vector([0.5, 0.5])) for i in range(3)]
    selection = select_candidates("pos", "x is y.", 0.6, candidates, config)
    outcome = mine_without_llm(row, selection, config)
    triplet = outcome.triplet
    assert triplet is not None
    validate_rows([triplet], TRIPLET)
    assert triplet["negative_ids"] == ["n0", "n1"]
    assert triplet["negative_teacher_scores"] == [0.5, 0.4]
    assert triplet["negative_llm_scores"] is None and triplet["positive_relabeled"] is False
    assert triplet["positive_embedding"] == pytest.approx([0.6, 0.8])
    assert triplet["teacher_model"] == TEACHER

    empty = select_candidates("pos", "x is y.", 0.6, [Candidate("pos", "x is y.", 0.6)], config)
    rejected = mine_without_llm(row, empty, config)
    assert rejected.triplet is None and rejected.reason == "no_negatives"
    assert "1 the positive" in (rejected.detail or "")


def test_build_triplet_writes_null_embeddings_when_the_run_does_not_keep_them() -> None:
    config = _config(keep_embeddings=False)
    triplet = build_triplet(_row(), _candidate("pos", 0.6), [_candidate("n", 0.3)], [0.1], relabeled=False,
                            config=config)
    validate_rows([triplet], TRIPLET)
    assert triplet["query_embedding"] is None and triplet["negative_embeddings"] is None


# --- LLM scoring ------------------------------------------------------------------------------------------------------


def test_fuse_llm_scores_is_reciprocal_rank_fusion_with_shared_ranks_for_ties() -> None:
    grades = {"a": 3, "b": 2, "c": 2, "d": 0}
    assert fuse_llm_scores([grades]) == {
        "a": 1 / (RRF_K + 1), "b": 1 / (RRF_K + 2), "c": 1 / (RRF_K + 2), "d": 1 / (RRF_K + 4),
    }
    likelihood = {"a": -9.0, "b": -1.0, "c": -2.0, "d": -3.0}
    fused = fuse_llm_scores([grades, likelihood])
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 64)
    with pytest.raises(ValueError, match="same passages"):
        fuse_llm_scores([grades, {"a": 1.0}])


@pytest.mark.parametrize(
    ("grades", "fused", "expected"),
    [
        ({"pos": 2, "x": 3, "y": 1}, {"pos": 0.2, "x": 0.3, "y": 0.1}, "x"),
        ({"pos": 3, "x": 3}, {"pos": 0.2, "x": 0.3}, None),  # not strictly better graded
        ({"pos": 1, "x": 2}, {"pos": 0.2, "x": 0.3}, None),  # below relabel_min_grade
        ({"pos": 2, "x": 3}, {"pos": 0.3, "x": 0.2}, None),  # the fusion disagrees
        ({"x": 3}, {"x": 0.3}, None),  # the positive's grade failed
    ],
)
def test_decide_relabel_needs_a_clearly_better_candidate(
    grades: dict[str, int], fused: dict[str, float], expected: str | None
) -> None:
    assert decide_relabel("pos", grades, fused, {}, min_grade=3) == expected


def _judgements(pair_id: str, grades: dict[str, int | str | None]) -> list[LLMJudgement]:
    """Relevance judgements: an int is a grade, None a garbled answer, "skip" a call the budget did not allow."""
    judgements = []
    for pid, grade in grades.items():
        if grade is None:
            judgements.append(LLMJudgement(pair_id, pid, "relevance", False, None, "garbage", "invalid answer"))
        elif grade == "skip":
            judgements.append(LLMJudgement(pair_id, pid, "relevance", False, None, "", "budget", skipped=True))
        else:
            raw = json.dumps({"relevance": grade})
            judgements.append(LLMJudgement(pair_id, pid, "relevance", True, float(grade), raw))
    return judgements


def test_judge_candidates_relabels_drops_relevant_and_failed_and_keeps_graded_negatives() -> None:
    config = _config(llm_scoring=True, k=8, num_negatives=3, llm_candidates=5)
    row = _row()
    hits = [_candidate("better", 0.5), _candidate("partial", 0.45), _candidate("failed", 0.4),
            _candidate("hard", 0.35), _candidate("skipped", 0.32), _candidate("unscored", 0.3)]
    selection = select_candidates("pos", "x is y.", 0.6, hits, config)
    grades = {"pos": 2, "better": 3, "partial": 2, "failed": None, "hard": 1, "skipped": "skip"}
    outcome = judge_candidates(row, selection, _judgements("pair-1", grades), config)
    triplet = outcome.triplet
    assert triplet is not None
    validate_rows([triplet], TRIPLET)
    assert (triplet["positive_id"], triplet["positive_relabeled"]) == ("better", True)
    assert triplet["positive_teacher_score"] == 0.5
    # "unscored" is beyond llm_candidates: with LLM scoring on, only judged candidates become negatives.
    assert triplet["negative_ids"] == ["hard"]
    assert triplet["negative_llm_scores"] == [1 / (RRF_K + 4)]
    assert dict(outcome.counts) == {
        "positive_llm_failed": 0, "dropped.llm_failed": 1, "dropped.llm_skipped": 1, "relabeled": 1,
        "dropped.llm_relevant": 1,
    }


def test_judge_candidates_rejects_an_irrelevant_positive_and_reports_failures_when_nothing_is_left() -> None:
    config = _config(llm_scoring=True, k=8, num_negatives=2, llm_candidates=2)
    row = _row()
    selection = select_candidates("pos", "x is y.", 0.6, [_candidate("a", 0.5), _candidate("b", 0.4)], config)
    irrelevant = judge_candidates(row, selection, _judgements("pair-1", {"pos": 0, "a": 1, "b": 0}), config)
    assert irrelevant.reason == "positive_judged_irrelevant"
    assert irrelevant.raw_answer == '{"relevance": 0}'

    failed = judge_candidates(row, selection, _judgements("pair-1", {"pos": None, "a": None, "b": 3}), config)
    assert failed.reason == "no_negatives"
    assert failed.raw_answer == "garbage"
    assert dict(failed.counts) == {
        "positive_llm_failed": 1, "dropped.llm_failed": 1, "dropped.llm_skipped": 0, "dropped.llm_relevant": 1,
    }


def test_llm_requests_cover_the_positive_and_the_top_candidates_and_read_back() -> None:
    config = _config(llm_scoring=True, query_likelihood=True, k=8, num_negatives=1, llm_candidates=2)
    row = _row()
    selection = select_candidates("pos", "x is y.", 0.6, [_candidate(f"c{i}", 0.5 - i / 10) for i in range(4)],
                                  config)
    scored = [(candidate.passage_id, candidate.text) for candidate in selection.candidates[:config.llm_candidates]]
    requests = build_llm_requests(row, scored, query_likelihood=config.query_likelihood)
    assert [r.request_id for r in requests] == [
        f"pair-1/{pid}/{signal}" for pid in ("pos", "c0", "c1") for signal in ("relevance", "likelihood")
    ]
    relevance, likelihood = requests[0], requests[1]
    assert relevance.prompt_name == "negative_scoring" and relevance.output_model is not None
    assert "<query>\nwhat is x?\n</query>" in relevance.messages[-1].content
    assert likelihood.mode == "score" and likelihood.continuations == ("what is x?",)
    assert read_judgement(LLMAnswer(relevance, True, {"relevance": 3}, "{}", None, Usage())).value == 3.0
    infinite = read_judgement(LLMAnswer(likelihood, True, {"logprobs": [-math.inf]}, "[]", None, Usage()))
    assert not infinite.ok and "non-finite" in (infinite.error or "")


# --- The PTransform ---------------------------------------------------------------------------------------------------


def _check_by_id(expected: dict[str, dict[str, Any]], key: str) -> Callable[[Iterable[dict[str, Any]]], None]:
    def check(actual: Iterable[dict[str, Any]]) -> None:
        actual_by_id = {row[key]: row for row in actual}
        if actual_by_id != expected:
            missing = sorted(set(expected) - set(actual_by_id))
            extra = sorted(set(actual_by_id) - set(expected))
            differing = sorted(i for i in set(expected) & set(actual_by_id) if expected[i] != actual_by_id[i])
            raise BeamAssertException(f"missing {missing}, unexpected {extra}, differing {differing[:5]}")

    return check


def _random_corpus() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """2,000 passages (dim 32) and 60 queries, with a near-duplicate, a text duplicate and exact ties built in."""
    rng = np.random.default_rng(11)
    vectors = normalized_vectors(rng, 2000, 32)
    vectors[1500:1520] = vectors[42]  # 21 identical vectors: exact ties across shards
    passages = [
        {"passage_id": f"p{index:05d}", "text": f"passage number {index}", "embedding": vector.tolist()}
        for index, vector in enumerate(vectors)
    ]
    # A text duplicate of query 0's positive, with a vector close enough to be among its hits.
    duplicate = vectors[30] + 0.6 * normalized_vectors(rng, 1, 32)[0]
    passages[1600] |= {"text": passages[30]["text"], "embedding": (duplicate / np.linalg.norm(duplicate)).tolist()}
    near = vectors[60] + 0.05 * normalized_vectors(rng, 1, 32)[0]
    passages[1601]["embedding"] = (near / np.linalg.norm(near)).astype(np.float32).tolist()  # near-copy of query 1's
    queries = []
    for query_index in range(60):
        positive = passages[30 * (query_index + 1)]
        noisy = np.asarray(positive["embedding"], dtype=np.float32) + 0.7 * normalized_vectors(rng, 1, 32)[0]
        queries.append(_row(
            f"pair-{query_index:03d}", query=f"query {query_index}", passage_id=positive["passage_id"],
            passage=positive["text"], query_embedding=(noisy / np.linalg.norm(noisy)).astype(np.float32).tolist(),
            positive_embedding=positive["embedding"],
        ))
    # Query 7 leans towards the 21 tied copies: they become its hardest negatives, in passage_id order.
    leaning = np.asarray(queries[7]["positive_embedding"], dtype=np.float32) + 0.8 * vectors[42]
    queries[7]["query_embedding"] = (leaning / np.linalg.norm(leaning)).astype(np.float32).tolist()
    return queries, passages


def _reference_triplets(queries: list[dict[str, Any]], passages: list[dict[str, Any]], config: MineNegativesConfig):
    """What the stage must produce, from a brute-force search over the whole corpus and the pure functions."""
    ids = [p["passage_id"] for p in passages]
    vectors = np.asarray([p["embedding"] for p in passages], dtype=np.float32)
    by_id = {p["passage_id"]: p for p in passages}
    kept: dict[str, dict[str, Any]] = {}
    rejected: dict[str, dict[str, Any]] = {}
    for row in queries:
        hits = brute_force_top_k(ids, vectors, np.asarray(row["query_embedding"], dtype=np.float32), config.k)
        candidates = [
            Candidate(h.passage_id, by_id[h.passage_id]["text"], h.score, pack_vector(by_id[h.passage_id]["embedding"]))
            for h in hits
        ]
        score = teacher_score(row["query_embedding"], row["positive_embedding"])
        selection = select_candidates(row["passage_id"], row["passage"], score, candidates, config)
        outcome = mine_without_llm(row, selection, config)
        if outcome.triplet is not None:
            kept[row["pair_id"]] = outcome.triplet
        else:
            rejected[row["pair_id"]] = {
                "stage": STAGE, "reason": outcome.reason, "record_id": row["pair_id"], "raw_answer": None,
                "payload": rejected_payload(row), "detail": outcome.detail,
            }
    return kept, rejected


def _with_parsed_payload(rejected: dict[str, Any]) -> dict[str, Any]:
    return {**rejected, "payload": json.loads(rejected["payload"])}


def _passage_inputs(pipeline: beam.Pipeline, passages: list[dict[str, Any]]) -> dict[str, beam.PCollection]:
    """`_MineEmbedded`'s passage inputs from {"passage_id", "text", "embedding"} rows: texts and vectors apart."""
    return {
        "passage_texts": pipeline | "PassageTexts" >> beam.Create(
            [(row["passage_id"], row["text"]) for row in passages]),
        "passage_vectors": pipeline | "PassageVectors" >> beam.Create(
            [(row["passage_id"], pack_vector(row["embedding"])) for row in passages]),
    }


def _run_mining(
    queries: list[dict[str, Any]],
    passages: list[dict[str, Any]],
    configs: dict[str, MineNegativesConfig],
    llm_spec: LLMSpec | None,
    expected_kept: dict[str, dict[str, Any]],
    expected_rejected: dict[str, dict[str, Any]],
    expected_statistics: dict[str, int] | None = None,
    expected_answers: int = 0,
) -> dict[str, dict[str, int]]:
    """Runs the mining once per config in one pipeline (Beam's fixed cost dominates at this size); checks each one's
    outputs, and that every query ends in exactly one kept or rejected row; returns each one's stage counters."""
    pipeline = TestPipeline()
    inputs = {"queries": pipeline | "Queries" >> beam.Create(queries), **_passage_inputs(pipeline, passages)}
    for label, config in configs.items():
        llm = None if llm_spec is None or not config.llm_scoring else ModelAccess.llm(llm_spec)
        outputs = inputs | label >> _MineEmbedded(config, llm)
        assert_that(outputs["kept"], _check_by_id(expected_kept, "triplet_id"), label=f"{label}/CheckKept")
        assert_that(
            outputs["rejected"] | f"{label}/ParsePayload" >> beam.Map(_with_parsed_payload),
            _check_by_id(expected_rejected, "record_id"),
            label=f"{label}/CheckRejected",
        )
        rows = ((outputs["kept"], outputs["rejected"]) | f"{label}/Rows" >> beam.Flatten()
                | f"{label}/CountRows" >> beam.combiners.Count.Globally())
        assert_that(rows, equal_to([len(queries)]), label=f"{label}/CheckRows")
        answers = outputs["answers"] | f"{label}/CountAnswers" >> beam.combiners.Count.Globally()
        assert_that(answers, equal_to([expected_answers]), label=f"{label}/CheckAnswers")
        if expected_statistics is not None:
            statistics = (outputs["tallies"]
                          | f"{label}/Statistics" >> beam.Filter(lambda kv: kv[0][0] == "mining")
                          | f"{label}/StatisticNames" >> beam.Map(lambda kv: (kv[0][1], kv[1])))
            assert_that(statistics, equal_to(list(expected_statistics.items())), label=f"{label}/CheckStatistics")
    result = pipeline.run()
    result.wait_until_finish()
    totals: dict[str, dict[str, int]] = {label: {} for label in configs}
    for counter in result.metrics().query(MetricsFilter().with_namespace(f"embforge.{STAGE}"))["counters"]:
        label = next(label for label in configs if counter.key.step.startswith(label))
        name = counter.key.metric.name
        totals[label][name] = totals[label].get(name, 0) + counter.committed
    return totals


@pytest.mark.slow
def test_sharded_search_gives_the_same_triplets_as_unsharded_and_accounts_for_every_query() -> None:
    queries, passages = _random_corpus()
    base = dict(k=16, num_negatives=5)
    expected, expected_rejected = _reference_triplets(queries, passages, _config(**base))
    # The built-in cases did happen: dropped near-copy, dropped text duplicate, ties broken by id.
    assert "p01601" not in expected["pair-001"]["negative_ids"]
    assert "p01600" not in expected["pair-000"]["negative_ids"]
    assert expected["pair-007"]["negative_ids"] == ["p00042", "p01500", "p01501", "p01502", "p01503"]
    broken = _row("pair-broken", query_embedding=[])
    twins = [_row("pair-twin", query_embedding=queries[0]["query_embedding"],
                  positive_embedding=queries[0]["positive_embedding"])] * 2
    mismatched = _row("pair-mismatched", query_embedding=queries[0]["query_embedding"])
    orphan = _row("pair-orphan", passage_id="not-in-corpus", query_embedding=queries[0]["query_embedding"],
                  positive_embedding=None)
    # Half the queries come without positive_embedding: the stage looks it up in the corpus, same triplets.
    lookups = [
        {key: value for key, value in row.items() if key != "positive_embedding"} if index % 2 else row
        for index, row in enumerate(queries)
    ]
    all_queries = [*lookups, broken, mismatched, orphan, *twins]
    expected_rejected |= {
        "pair-broken": {
            "stage": STAGE, "reason": "missing_embedding", "record_id": "pair-broken", "raw_answer": None,
            "payload": rejected_payload(broken), "detail": "query row has no query_embedding",
        },
        "pair-orphan": {
            "stage": STAGE, "reason": "missing_embedding", "record_id": "pair-orphan", "raw_answer": None,
            "payload": rejected_payload(orphan),
            "detail": "no positive_embedding in the row, and the positive 'not-in-corpus' is not in the corpus",
        },
        "pair-mismatched": {
            "stage": STAGE, "reason": "embedding_mismatch", "record_id": "pair-mismatched", "raw_answer": None,
            "payload": rejected_payload(mismatched),
            "detail": "query_embedding has 32 dimensions, positive_embedding 2: both must come from the same teacher "
                      "at the same dimension",
        },
        # The twins share a record_id, so this check sees one of them; the row count sees both.
        "pair-twin": {
            "stage": STAGE, "reason": "duplicate_pair_id", "record_id": "pair-twin", "raw_answer": None,
            "payload": rejected_payload(twins[0]),
            "detail": "2 query rows share pair_id 'pair-twin'; pair_id must be unique",
        },
    }
    configs = {
        "Unsharded": _config(**base, shard_size=10_000),
        "Sharded": _config(**base, shard_size=37, query_groups=3),  # 55 shards x 3 query groups
        # An approximate index that probes every list misses nothing: the config reaches each shard's search.
        "ApproximateExhaustive": _config(**base, index="IVF16,Flat", nprobe=16),
    }
    # Every run must equal the one reference, so the sharded triplets equal the unsharded ones, scores included.
    for totals in _run_mining(all_queries, passages, configs, None, expected, expected_rejected).values():
        assert totals["dropped.teacher_threshold"] >= 1 and totals["dropped.duplicate_text"] >= 1
        assert totals["dropped.positive"] >= len(queries) - 1


def test_the_configured_index_is_what_each_shard_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The failing run leaves its search's spill files where they were: in this test's folder, not the machine's /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    queries, passages = _random_corpus()
    # More lists than passages: only a shard that really builds the configured index fails, and says why.
    with pytest.raises(Exception, match="mining index 'IVF4096,Flat' cannot be built over a shard of 2,000 passages"):
        with TestPipeline() as pipeline:
            inputs = {"queries": pipeline | "Queries" >> beam.Create(queries[:3]),
                      **_passage_inputs(pipeline, passages)}
            _ = inputs | _MineEmbedded(_config(k=16, num_negatives=5, index="IVF4096,Flat"), None)


def _axis_vector(dim: int, query_axis: int, own_axis: int, cosine: float) -> list[float]:
    """Unit vector with `cosine` along the query's axis and the rest on an axis of its own: scores known exactly."""
    vector = np.zeros(dim, dtype=np.float32)
    vector[query_axis] = cosine
    vector[own_axis] = math.sqrt(1 - cosine**2)
    return vector.tolist()


@pytest.mark.slow
def test_llm_scoring_relabels_drops_false_negatives_and_rejects_what_it_must() -> None:
    dim = 40
    passages: list[dict[str, Any]] = []
    queries = []
    designs = {
        # query A: relabel to "better", drop "near" (teacher) and "partial" (LLM), skip "broken", keep two negatives.
        "A": [("pos", 0.90, "positive A [grade=2] [ql=-2]"), ("near", 0.89, "near copy A [grade=3]"),
              ("better", 0.80, "better A [grade=3] [ql=-1]"), ("partial", 0.75, "partial A [grade=2] [ql=-3]"),
              ("topical", 0.70, "topical A [grade=1] [ql=-4]"), ("broken", 0.65, "broken A [garbage]"),
              ("other", 0.60, "other A [grade=0] [ql=-5]"), ("copy", 0.10, "positive A [grade=2] [ql=-2]")],
        # query B: every candidate is relevant and none beats the positive: no negatives.
        "B": [("pos", 0.90, "positive B [grade=3]"), *((f"rel{i}", 0.80 - i / 20, f"rel B{i} [grade={2 + i % 2}]")
                                                        for i in range(5))],
        # query C: the positive is irrelevant and nothing better exists.
        "C": [("pos", 0.90, "positive C [grade=0]"), *((f"weak{i}", 0.80 - i / 20, f"weak C{i} [grade={i % 2}]")
                                                        for i in range(5))],
    }
    own_axis = 3
    for query_axis, (name, design) in enumerate(designs.items()):
        for suffix, cosine, text in design:
            passages.append({"passage_id": f"{name}-{suffix}", "text": text,
                             "embedding": _axis_vector(dim, query_axis, own_axis, cosine)})
            own_axis += 1
        query_embedding = np.zeros(dim, dtype=np.float32)
        query_embedding[query_axis] = 1.0
        positive = passages[-len(design)]
        queries.append(_row(f"pair-{name}", query=f"query {name}", passage_id=positive["passage_id"],
                            passage=positive["text"], query_embedding=query_embedding.tolist(),
                            positive_embedding=positive["embedding"]))
    config = _config(k=10, num_negatives=3, llm_scoring=True, query_likelihood=True, llm_candidates=5)
    by_id = {p["passage_id"]: p for p in passages}

    def expected_negative(pid: str) -> float:
        return teacher_score(queries[0]["query_embedding"], by_id[pid]["embedding"])

    better = by_id["A-better"]
    expected_kept = {"pair-A": {
        "triplet_id": "pair-A", "task": queries[0]["task"], "query_id": "q-pair-A", "query": "query A",
        "positive_id": "A-better", "positive": better["text"], "positive_relabeled": True,
        "negative_ids": ["A-topical", "A-other"], "negatives": [by_id["A-topical"]["text"], by_id["A-other"]["text"]],
        "positive_teacher_score": expected_negative("A-better"),
        "negative_teacher_scores": [expected_negative("A-topical"), expected_negative("A-other")],
        # relevance ranks 4 and 5 (pos and partial share rank 2), likelihood ranks 4 and 5.
        "negative_llm_scores": [2 / (RRF_K + 4), 2 / (RRF_K + 5)],
        "query_embedding": queries[0]["query_embedding"], "positive_embedding": better["embedding"],
        "negative_embeddings": [by_id["A-topical"]["embedding"], by_id["A-other"]["embedding"]],
        "teacher_model": TEACHER,
    }}
    payloads = {q["pair_id"]: {k: v for k, v in q.items() if not k.endswith("_embedding")} for q in queries}
    expected_rejected = {
        "pair-B": {
            "stage": STAGE, "reason": "no_negatives", "record_id": "pair-B", "raw_answer": None,
            "payload": payloads["pair-B"],
            "detail": "10 hits: 1 the positive, 0 same text as the positive, 0 above 0.8550 (ratio x positive score "
                      "0.9000), 9 left; of the 5 LLM-scored: 5 graded relevant (>= 2), 0 failed answers, 0 not called "
                      "(LLM budget spent); need at least 1",
        },
        "pair-C": {
            "stage": STAGE, "reason": "positive_judged_irrelevant", "record_id": "pair-C",
            "raw_answer": '{"relevance": 0}', "payload": payloads["pair-C"],
            "detail": "the LLM graded the positive 0 (< min_positive_grade 1) and no candidate qualified as a better "
                      "positive",
        },
    }
    validate_rows(expected_kept.values(), TRIPLET)
    spec = LLMSpec(backend="custom", model=FACTORY)
    expected_statistics = {
        "hits": 30, "dropped.positive": 3,
        "dropped.teacher_threshold": 1, "dropped.duplicate_text": 1,  # A-near, A-copy
        "dropped.llm_relevant": 1 + 5, "dropped.llm_failed": 1,  # A-partial and B's five; A-broken
        "relabeled": 1, "negatives": 2, "short_triplets": 1,
    }
    totals = _run_mining(queries, passages, {"Mine": config}, spec, expected_kept, expected_rejected,
                         expected_statistics, expected_answers=3 * 6 * 2)["Mine"]
    assert {name: totals[name] for name in expected_statistics} == expected_statistics


def test_rejected_rows_match_the_schema() -> None:
    config = _config(k=4, num_negatives=2)
    row = _row()
    outcome = mine_without_llm(row, select_candidates("pos", "x is y.", 0.6, [], config), config)
    rejected = rejected_row(STAGE, outcome.reason or "", rejected_payload(row), record_id=row["pair_id"],
                            detail=outcome.detail)
    validate_rows([rejected], REJECTED)
    assert "query_embedding" not in json.loads(rejected["payload"])


@pytest.mark.slow
def test_the_stage_joins_pairs_and_passages_with_their_teacher_vectors_and_rejects_pairs_without_one() -> None:
    pair = {key: value for key, value in _row("pair-1").items() if key not in ("query_embedding", "positive_embedding")}
    unembedded = {**pair, "pair_id": "pair-2", "query_id": "q-pair-2"}
    passages = [{"passage_id": pid, "title": None, "text": f"text of {pid}"} for pid in ("pos", "hard", "easy", "bare")]
    vectors = [{"id": "pair-1", "task_type": "RETRIEVAL_QUERY", "embedding": [1.0, 0.0]}] + [
        {"id": pid, "task_type": "RETRIEVAL_DOCUMENT", "embedding": vector}
        for pid, vector in (("pos", [0.6, 0.8]), ("hard", [0.5, 0.5]), ("easy", [0.1, 0.9]))]  # "bare" has none
    # A vector of no passage of the corpus is not searched: it would rank between "hard" and "easy".
    vectors.append({"id": "not-a-passage", "task_type": "RETRIEVAL_DOCUMENT", "embedding": [0.4, 0.9]})
    with TestPipeline() as pipeline:
        outputs = {
            "pairs": pipeline | "Pairs" >> beam.Create([pair, unembedded]),
            "passages": pipeline | "Passages" >> beam.Create(passages),
            "vectors": pipeline | "Vectors" >> beam.Create(vectors),
        } | MineNegatives(_config(k=4, num_negatives=2), teacher=ModelIdentity("teacher", "v1"))
        assert_that(outputs["kept"] | "Kept" >> beam.Map(lambda t: (t["triplet_id"], t["negative_ids"],
                                                                      t["teacher_model"])),
                    equal_to([("pair-1", ["hard", "easy"], TEACHER)]), label="Kept")
        assert_that(outputs["rejected"] | "Rejected" >> beam.Map(lambda r: (r["record_id"], r["reason"])),
                    equal_to([("pair-2", "missing_embedding")]), label="Rejected")


# --- The DoFns, called directly ---------------------------------------------------------------------------------------


def test_key_queries_fn_keys_rows_asks_the_search_and_tags_each_rejection_with_its_reason() -> None:
    rows = [_row("with-positive"), _row("looks-up-positive", positive_embedding=None), _row("no-query", query=""),
            _row("no-vector", query_embedding=None), _row("mismatch", positive_embedding=[1.0, 0.0, 0.0])]
    outputs = run_dofn(_KeyQueriesFn(_config()), rows)
    assert [(pair_id, row["query_embedding"], row["positive_embedding"]) for pair_id, row in outputs.main] == [
        ("with-positive", pack_vector([1.0, 0.0]), pack_vector([0.6, 0.8])),
        ("looks-up-positive", pack_vector([1.0, 0.0]), None)]
    # The search looks a missing positive up by its passage_id, in the shard that holds it.
    assert outputs.tagged["search"] == [("with-positive", pack_vector([1.0, 0.0]), None),
                                        ("looks-up-positive", pack_vector([1.0, 0.0]), "pos")]
    assert [(row["record_id"], row["reason"]) for row in outputs.tagged["rejected"]] == [
        ("no-query", "missing_field"), ("no-vector", "missing_embedding"), ("mismatch", "embedding_mismatch")]
    validate_rows(outputs.tagged["rejected"], REJECTED)
    assert outputs.tallies == {}  # rows are counted as they leave the stage; no statistics yet


def test_select_fn_mines_a_triplet_rejects_what_it_cannot_and_emits_the_mining_statistics() -> None:
    config = _config(k=4, num_negatives=2)
    keyed = dict(run_dofn(_KeyQueriesFn(config), [_row("good"), _row("lost", positive_embedding=None),
                                                   _row("twice")]).main)
    hits = [("pos", "x is y.", 0.6, None)] + [(f"n{i}", f"neg {i}", 0.5 - i / 10, pack_vector([0.5, 0.5]))
                                              for i in range(3)]
    elements = [
        ("good", {"query": [keyed["good"]], "results": [(hits, None)]}),
        # The shard holding the positive returned no vector for it: it is not in the corpus.
        ("lost", {"query": [keyed["lost"]], "results": [(hits, None)]}),
        ("twice", {"query": [keyed["twice"], keyed["twice"]], "results": [(hits, None)]}),
    ]
    outputs = run_dofn(_SelectFn(config, llm=False), elements)
    [triplet] = outputs.main
    validate_rows([triplet], TRIPLET)
    assert (triplet["triplet_id"], triplet["negative_ids"]) == ("good", ["n0", "n1"])
    assert [(row["record_id"], row["reason"]) for row in outputs.tagged["rejected"]] == [
        ("lost", "missing_embedding"), ("twice", "duplicate_pair_id"), ("twice", "duplicate_pair_id")]
    assert outputs.tallies == {("mining", "hits"): 4, ("mining", "dropped.positive"): 1, ("mining", "negatives"): 2}


def _graded(request, grade: int) -> LLMAnswer:
    return LLMAnswer(request, True, {"relevance": grade}, json.dumps({"relevance": grade}), None, Usage())


def test_select_fn_hands_enough_candidates_to_the_llm_and_judge_fn_finishes_them() -> None:
    config = _config(llm_scoring=True, k=8, num_negatives=2, llm_candidates=3, min_negatives=1)
    keyed = dict(run_dofn(_KeyQueriesFn(config), [_row("pair-1")]).main)
    hits = [(f"n{i}", f"neg {i}", 0.5 - i / 10, pack_vector([0.5, 0.5])) for i in range(4)]
    element = ("pair-1", {"query": [keyed["pair-1"]], "results": [(hits, None)]})
    selected = run_dofn(_SelectFn(config, llm=True), [element])
    assert selected.main == [] and "rejected" not in selected.tagged
    [(pair_id, pending)] = selected.tagged["pending"]
    # The positive and the top llm_candidates candidates are graded.
    assert [request.context[1] for request in selected.tagged["requests"]] == ["pos", "n0", "n1", "n2"]
    grades = {"pos": 3, "n0": 0, "n1": 3, "n2": 1}
    judgements = [read_judgement(_graded(request, grades[request.context[1]]))
                  for request in selected.tagged["requests"]]
    judged = run_dofn(_JudgeFn(config), [(pair_id, {"pending": [pending], "judgements": judgements})])
    [triplet] = judged.main
    assert triplet["negative_ids"] == ["n0", "n2"]  # n1 reads as relevant: a false negative, dropped
    assert judged.tallies[("mining", "dropped.llm_relevant")] == 1 and judged.tallies[("mining", "negatives")] == 2


def _vector_item(row: dict[str, Any], id_field: str, task_type: str, vector_field: str) -> dict[str, Any]:
    return {"id": row[id_field], "task_type": task_type, "embedding": row[vector_field]}


def _negatives_line(triplet: dict[str, Any]) -> str:
    return json.dumps([triplet["triplet_id"], triplet["negative_ids"]])


@pytest.mark.slow
def test_two_worker_processes_over_4_shards_and_2_query_groups_choose_the_unsharded_negatives(tmp_path) -> None:
    # Issue #15: the search spread over (shard, query group) units on separate worker processes, as Dataflow spreads
    # it, must choose what embforge's mining functions choose over one unsharded index.
    from pipelines.config import BeamConfig, GenerateConfig
    from pipelines.run import pipeline_options
    from pipelines.sharded_search import build_shard_index, search_shard

    rng = np.random.default_rng(15)
    corpus = normalized_vectors(rng, 240, 16)
    positives = rng.integers(0, len(corpus), 30)
    # Each query near its positive, as a generated query is: the positive-aware threshold leaves negatives to choose.
    near = corpus[positives] + 0.4 * normalized_vectors(rng, len(positives), 16)
    queries = near / np.linalg.norm(near, axis=1, keepdims=True)
    config = MineNegativesConfig(teacher_model="t", k=12, num_negatives=4, shard_size=60, query_groups=2,
                                 keep_embeddings=False)

    def text(index: int) -> str:
        return f"passage {index}"

    shard = build_shard_index([str(index) for index in range(len(corpus))], corpus)
    expected = {}
    pairs = []
    for query, (hits, positive) in enumerate(zip(search_shard(shard, queries, config.k), positives, strict=True)):
        candidates = [Candidate(hit.passage_id, text(int(hit.passage_id)), hit.score) for hit in hits]
        selection = select_candidates(str(positive), text(positive), teacher_score(queries[query], corpus[positive]),
                                      candidates, config)
        row = {"pair_id": f"q{query}", "query_id": f"q{query}", "query": f"query {query}", "task": "t",
               "passage_id": str(positive), "passage": text(positive), "query_type": "question",
               "query_embedding": queries[query].tolist(), "positive_embedding": corpus[positive].tolist()}
        pairs.append(row)
        outcome = mine_without_llm(row, selection, config)
        if outcome.triplet is not None:
            expected[outcome.triplet["triplet_id"]] = outcome.triplet["negative_ids"]
    passages = [{"passage_id": str(index), "text": text(index), "embedding": corpus[index].tolist()}
                for index in range(len(corpus))]

    # The options `embforge generate` runs multi_processing with (they keep Beam from looking anything up online).
    beam_config = BeamConfig(direct_running_mode="multi_processing", direct_num_workers=2)
    with beam.Pipeline(options=pipeline_options(GenerateConfig(beam=beam_config))) as pipeline:
        pair_rows = pipeline | "Pairs" >> beam.Create(pairs)
        passage_rows = pipeline | "Passages" >> beam.Create(passages)
        vectors = (
            pair_rows | "QueryVectors" >> beam.Map(_vector_item, "pair_id", "RETRIEVAL_QUERY", "query_embedding"),
            passage_rows | "PassageVectors" >> beam.Map(_vector_item, "passage_id", "RETRIEVAL_DOCUMENT", "embedding"),
        ) | "Vectors" >> beam.Flatten()
        mined = {"pairs": pair_rows, "passages": passage_rows, "vectors": vectors} | MineNegatives(config)
        mined["kept"] | "Lines" >> beam.Map(_negatives_line) | beam.io.WriteToText(str(tmp_path / "kept"))
    chosen = dict(json.loads(line) for path in tmp_path.glob("kept*") for line in path.read_text().splitlines())
    assert len(expected) >= 20 and chosen == expected
