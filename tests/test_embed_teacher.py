from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.budget import RunBudget, Spend, cheapest_prefix
from pipelines.cache import EMBEDDING_CACHE, cache_files, read_cache_file
from pipelines.cached_calls import _CallMissesFn
from pipelines.clients.base import TaskType
from pipelines.clients.factory import embedder_identity
from pipelines.clients.specs import EmbedderSpec
from pipelines.model_access import ModelAccess
from pipelines.sharded_search import unpack_vector
from pipelines.stages.embed_teacher import (
    STAGE,
    EmbedTeacher,
    EmbedTeacherConfig,
    TeacherCallHandler,
    embedding_cache_key,
    estimated_embedding_usage,
)
from tests.dofn_lifecycle import run_dofn
from tests.fakes.backends import keyword_embedder
from tests.fakes.gemini_server import FakeGeminiServer

SPEC = EmbedderSpec(backend="custom", model="tests.fakes.backends:keyword_embedder")
ITEMS = [
    {"id": "q1", "text": "parse json text", "task_type": TaskType.RETRIEVAL_QUERY.value},
    {"id": "q2", "text": "parse json text", "task_type": TaskType.RETRIEVAL_QUERY.value},  # same text: embedded once
    {"id": "p1", "text": "parse json text", "task_type": TaskType.RETRIEVAL_DOCUMENT.value},
    {"id": "p2", "text": "sort a heap", "task_type": TaskType.RETRIEVAL_DOCUMENT.value},
]


def _rounded(vector: bytes) -> tuple[float, ...]:
    """A kept item's vector (float32 bytes) as rounded floats."""
    return tuple(round(float(x), 5) for x in unpack_vector(vector))


def _run(cache_dir, dimension=None):
    with TestPipeline() as pipeline:
        outputs = pipeline | "Items" >> beam.Create(ITEMS) | EmbedTeacher(
            ModelAccess.embedder(SPEC, str(cache_dir)), EmbedTeacherConfig(dimension=dimension, batch_size=2))
        expected = keyword_embedder().embed([item["text"] for item in ITEMS], TaskType.RETRIEVAL_QUERY, dimension)
        assert_that(
            outputs["kept"] | "Round" >> beam.Map(
                lambda row: (row["id"], _rounded(row["embedding"]))),
            equal_to([(item["id"], _rounded(vector)) for item, vector in zip(ITEMS, expected, strict=True)]),
            label="Embeddings",
        )
        assert_that(outputs["rejected"], equal_to([]), label="NoRejects")
        return outputs


@pytest.mark.slow
def test_second_run_reads_every_vector_from_the_cache(tmp_path):
    _run(tmp_path)
    first_files = cache_files(str(tmp_path), EMBEDDING_CACHE)
    entries = [row for path in first_files for row in read_cache_file(path, EMBEDDING_CACHE).to_pylist()]
    # Three distinct (task type, text) pairs: the duplicate query text was embedded once.
    assert len(entries) == 3
    _run(tmp_path)
    assert cache_files(str(tmp_path), EMBEDDING_CACHE) == first_files, "a re-run wrote new cache entries"


def test_dimension_is_part_of_the_key(tmp_path):
    _run(tmp_path, dimension=16)
    entries = [row for path in cache_files(str(tmp_path), EMBEDDING_CACHE)
               for row in read_cache_file(path, EMBEDDING_CACHE).to_pylist()]
    assert {row["dimension"] for row in entries} == {16}
    key16 = embedding_cache_key("m", "v", "RETRIEVAL_QUERY", 16, "x")
    assert key16 != embedding_cache_key("m", "v", "RETRIEVAL_QUERY", None, "x")
    assert key16 != embedding_cache_key("m", "v", "RETRIEVAL_DOCUMENT", 16, "x")


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="dimension"):
        EmbedTeacherConfig(dimension=0)


def test_embedding_cost_is_the_text_at_bytes_over_3_tokens_rounded_up():
    # 30 bytes -> 10 tokens at $0.15 per million = 1.5 micro-USD, rounded up; a local teacher costs nothing.
    gemini = EmbedderSpec(backend="gemini")
    assert estimated_embedding_usage(gemini, "x" * 30) == (10, 2)
    assert estimated_embedding_usage(gemini, "é" * 5) == (4, 1)  # 10 bytes: 3.33 -> 4 tokens
    assert estimated_embedding_usage(EmbedderSpec(), "x" * 30) == (10, 0)


@pytest.mark.slow
def test_a_cost_budget_embeds_the_smallest_keys_that_fit_what_earlier_stages_left(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    items = [{"id": f"p{index}", "text": f"passage {index} " + "word " * 40 * index,
              "task_type": TaskType.RETRIEVAL_DOCUMENT.value} for index in range(8)]
    with FakeGeminiServer() as server:
        spec = EmbedderSpec(backend="gemini", base_url=server.base_url, timeout_s=2.0, backoff_initial_s=0.01,
                            backoff_max_s=0.05)
        config = EmbedTeacherConfig(dimension=8, batch_size=3)
        costs = {embedding_cache_key(*embedder_identity(spec), item["task_type"], 8, item["text"]):
                 (item["id"], estimated_embedding_usage(spec, item["text"])[1]) for item in items}
        # An earlier stage made 4 LLM calls and spent 20 micro-USD: the call limit is reached, which does not stop
        # embeddings (they are not LLM calls); the cost limit leaves 40 micro-USD for them.
        budget = RunBudget(max_calls=4, max_cost_usd=0.00006)
        prefix = cheapest_prefix([(key, cost) for key, (_, cost) in costs.items()], None, 40)
        allowed = sorted(costs[key][0] for key, _ in prefix)
        assert 0 < len(allowed) < len(items)
        with TestPipeline() as pipeline:
            budget.spent = pipeline | "SpentBefore" >> beam.Create([Spend(calls=4, micro_usd=20)])
            outputs = pipeline | "Items" >> beam.Create(items) | EmbedTeacher(
                ModelAccess.embedder(spec, str(tmp_path), budget), config)
            assert_that(outputs["kept"] | "KeptIds" >> beam.Map(lambda row: row["id"]), equal_to(allowed),
                        label="Embedded")
            assert_that(outputs["rejected"] | "SkippedIds" >> beam.Map(lambda row: (row["record_id"], row["reason"])),
                        equal_to([(item["id"], "skipped_by_budget") for item in items if item["id"] not in allowed]),
                        label="Skipped")
            # What the stages after this one plan against: the earlier spend plus these texts' estimated cost.
            assert_that(budget.spent, equal_to([Spend(4, 20 + sum(cost for _, cost in prefix))]), label="RunSpend")
        sent = [text for record in server.requests for text in record.texts]
        assert sorted(sent) == sorted(item["text"] for item in items if item["id"] in allowed)


# --- The DoFn, called directly: CachedCall's miss-calling DoFn with the teacher's handler ---------------------------


def test_teacher_dofn_embeds_each_key_once_per_task_type_refuses_what_the_budget_left_out_and_counts_it(tmp_path):
    handler = TeacherCallHandler(STAGE, SPEC, embedder_identity(SPEC), EmbedTeacherConfig(batch_size=4))
    # Misses arrive grouped by key, as CachedCall's Order step leaves them: q1 and q2 share one text and task type.
    by_key: dict[str, list[dict]] = {}
    for item in ITEMS:
        by_key.setdefault(handler.key(item), []).append(item)
    batch = list(by_key.items())
    refused_key = handler.key(ITEMS[3])
    outputs = run_dofn(_CallMissesFn(handler, str(tmp_path), "max_cost_usd=0"), [batch],
                       frozenset(by_key) - {refused_key})
    expected = keyword_embedder().embed(["parse json text"], TaskType.RETRIEVAL_QUERY)[0]
    assert [(row["id"], row["task_type"]) for row in outputs.main] == [
        ("q1", "RETRIEVAL_QUERY"), ("q2", "RETRIEVAL_QUERY"), ("p1", "RETRIEVAL_DOCUMENT")]
    assert outputs.main[0]["embedding"] == outputs.main[1]["embedding"]
    assert unpack_vector(outputs.main[0]["embedding"]) == pytest.approx(list(expected))
    [refused] = outputs.tagged["rejected"]
    assert (refused["record_id"], refused["reason"]) == ("p2", "skipped_by_budget")
    assert "max_cost_usd=0" in refused["detail"]
    assert len(outputs.tagged["sent"]) == 2  # one per distinct (text, task type) sent
    assert outputs.tallies[("embedding", STAGE, "texts_embedded")] == 2
    assert outputs.tallies[("embedding", STAGE, "skipped_by_budget")] == 1
    # The cache is written by the time the bundle ends: both vectors, none for the refused text.
    entries = [entry for path in cache_files(str(tmp_path), EMBEDDING_CACHE)
               for entry in read_cache_file(path, EMBEDDING_CACHE).to_pylist()]
    assert sorted(entry["key"] for entry in entries) == sorted(set(by_key) - {refused_key})
