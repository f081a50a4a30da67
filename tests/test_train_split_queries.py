"""The SciFact `human_queries` ceiling's query writer (benchmarks/train_split_queries.py), through the real prompt.

It stands in for the LLM of `embforge generate`, so it must answer every prompt the query stage renders for the
passages it was given with a train-split claim that cites the passage, and fail (not invent) for any other passage.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.train_split_queries import CLAIMS_ENV, TASK, claim_writer, write_train_split_inputs
from pipelines.stages.generate_queries import GenerateQueriesConfig, build_requests
from tests.shared_data import SHARED_DATA_ENV, find_shared_data

SHARED_DATA = find_shared_data()
pytestmark = [
    pytest.mark.needs_shared_data,
    pytest.mark.skipif(SHARED_DATA is None, reason=f"shared evaluation data not found: set {SHARED_DATA_ENV}"),
]


def _prompt(row: dict):
    request = build_requests({"passage_id": row["_id"], "text": row["text"], "title": row["title"]},
                             GenerateQueriesConfig(query_types=("claim",)))[0]
    return request.messages, request.output_model


def _train_claims() -> dict[str, set[str]]:
    """Passage id -> the texts of the train-split claims that cite it, read here apart from the code under test."""
    folder = SHARED_DATA / "scifact"
    queries = {row["_id"]: row["text"] for row in map(json.loads, (folder / "queries.jsonl").read_text().splitlines())}
    cited: dict[str, set[str]] = {}
    for line in (folder / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        query_id, passage_id, _ = line.split("\t")
        cited.setdefault(passage_id, set()).add(queries[query_id])
    return cited


def test_every_passage_the_train_split_cites_gets_a_train_claim_that_cites_it(tmp_path, monkeypatch):
    """Only train-split passages and claims: a test claim could only come in as the claim of a passage it cites."""
    corpus_path, claims_path = write_train_split_inputs(SHARED_DATA / "scifact", tmp_path, seed=0)
    monkeypatch.setenv(CLAIMS_ENV, str(claims_path))
    writer = claim_writer()
    train = _train_claims()
    rows = [json.loads(line) for line in corpus_path.read_text().splitlines()]
    assert {row["_id"] for row in rows} == set(train)
    for row in rows:
        result = writer.generate(*_prompt(row))
        assert result.ok, row["_id"]
        assert result.value.task == TASK
        assert result.value.query in train[row["_id"]], row["_id"]
    assert writer.stats.calls == len(rows) and writer.stats.failures == 0


def test_a_passage_no_train_claim_cites_gets_a_failed_answer(tmp_path, monkeypatch):
    _, claims_path = write_train_split_inputs(SHARED_DATA / "scifact", tmp_path, seed=0)
    monkeypatch.setenv(CLAIMS_ENV, str(claims_path))
    writer = claim_writer()
    result = writer.generate(*_prompt({"_id": "x", "title": "Not in SciFact", "text": "A passage nobody cites."}))
    assert not result.ok and "no train-split claim" in result.error
    assert writer.stats.failures == 1


def test_the_writer_needs_its_claims_file(monkeypatch):
    monkeypatch.delenv(CLAIMS_ENV, raising=False)
    with pytest.raises(RuntimeError, match=CLAIMS_ENV):
        claim_writer()
