"""The one cached-call transform with both handlers: the DoFn lifecycle called directly (setup, process, finish_bundle,
teardown), and CachedCall on TestPipeline (misses called and cached, hits answered from the cache, failures never
cached)."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.cache import EMBEDDING_CACHE, LLM_CACHE, cache_files, read_cache_file
from pipelines.cached_calls import CachedCall, _CallMissesFn
from pipelines.clients.base import Embedder, TaskType
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.llm_calls import LLMCallHandler
from pipelines.model_access import ModelIdentity
from pipelines.stages.embed_teacher import EmbedTeacherConfig, TeacherCallHandler
from pipelines.stages.generate_queries import GenerateQueriesConfig, build_requests
from tests.dofn_lifecycle import run_dofn
from tests.fakes.backends import keyword_embedder

LLM = LLMSpec(backend="custom", model="tests.fakes.scripted_backends:query_writer")
TEACHER = EmbedderSpec(backend="custom", model="tests.fakes.backends:keyword_embedder")
FAILING_TEACHER = EmbedderSpec(backend="custom", model="tests.test_cached_calls:failing_embedder")
IDENTITY = ModelIdentity("scripted", "1")


class _FailingEmbedder(Embedder):
    """Fails every call, as a backend does once its retries are spent."""

    model_id = "failing"
    model_version = "1"

    def embed(self, texts, task_type, dimension=None):
        raise ConnectionError("the teacher is unreachable")


def failing_embedder() -> Embedder:
    return _FailingEmbedder()


def _requests(*texts: str):
    """One query-generation request per passage text; the scripted writer breaks its answer to a BROKEN passage."""
    return [request for index, text in enumerate(texts) for request in build_requests(
        {"passage_id": f"p{index}", "title": None, "text": text}, GenerateQueriesConfig())]


def test_llm_lifecycle_calls_each_key_once_caches_successes_only_and_counts_usage(tmp_path):
    handler = LLMCallHandler(LLM, IDENTITY, "stage")
    good, same, broken = _requests("Sorting puts items in order.", "Sorting puts items in order.", "BROKEN text.")
    batch = [(handler.key(good), handler.group([same, good])), (handler.key(broken), [broken])]
    called = run_dofn(_CallMissesFn(handler, str(tmp_path)), [batch], None)
    assert [(answer.request.request_id, answer.source, answer.ok) for answer in called.main] == [
        ("p0::q0", "backend", True), ("p1::q0", "duplicate", True), ("p2::q0", "backend", False)]
    entries = [row for path in cache_files(str(tmp_path), LLM_CACHE)
               for row in read_cache_file(path, LLM_CACHE).to_pylist()]
    assert [entry["key"] for entry in entries] == [handler.key(good)]  # the failure is never cached
    assert called.tallies[("llm", "stage", "calls")] == 2 and called.tallies[("cache", "llm_calls")] == 2
    # The budget's refusals are answers too, counted as skipped.
    refused = run_dofn(_CallMissesFn(handler, None, "max_llm_calls=0"), [batch[1:]], frozenset())
    assert [(answer.source, answer.error) for answer in refused.main] == [
        ("budget", "skipped: the run's LLM budget (max_llm_calls=0) is spent")]
    assert refused.tallies[("llm", "stage", "skipped_by_budget")] == 1


def test_teacher_lifecycle_embeds_caches_and_rejects_a_failed_batch_uncached(tmp_path):
    config = EmbedTeacherConfig(batch_size=4)
    items = [{"id": "a", "text": "parse json", "task_type": TaskType.RETRIEVAL_QUERY.value},
             {"id": "b", "text": "sort a heap", "task_type": TaskType.RETRIEVAL_DOCUMENT.value}]
    handler = TeacherCallHandler("embed", TEACHER, IDENTITY, config)
    batch = [(handler.key(item), [item]) for item in items]
    outputs = run_dofn(_CallMissesFn(handler, str(tmp_path)), [batch], None)
    vectors = {output["id"]: output["embedding"] for output in outputs.main}
    expected = keyword_embedder().embed(["parse json"], TaskType.RETRIEVAL_QUERY)[0]
    assert sorted(vectors) == ["a", "b"] and vectors["a"] == pytest.approx(list(expected))
    assert len(outputs.tagged["sent"]) == 2
    assert len(cache_files(str(tmp_path), EMBEDDING_CACHE)) == 1
    tallies = outputs.tallies
    assert tallies[("embedding", "embed", "texts_embedded")] == tallies[("cache", "embeddings_computed")] == 2

    failing = TeacherCallHandler("embed", FAILING_TEACHER, IDENTITY, config)
    failed = run_dofn(_CallMissesFn(failing, str(tmp_path / "failed")), [batch], None)
    rejected = failed.tagged["rejected"]
    assert [(row["record_id"], row["reason"]) for row in rejected] == [("a", "embedding_failed"),
                                                                       ("b", "embedding_failed")]
    assert "ConnectionError: the teacher is unreachable" in rejected[0]["detail"]
    assert cache_files(str(tmp_path / "failed"), EMBEDDING_CACHE) == []
    assert failed.main == []
    assert failed.tallies[("embedding", "embed", "texts_embedded")] == 2  # sent, so paid for, though it failed


@pytest.mark.slow
def test_cached_call_answers_hits_from_the_cache_and_calls_failures_again(tmp_path):
    requests = _requests("Sorting puts items in order.", "BROKEN text.", "Heaps keep the smallest first.")

    def run(label: str) -> None:
        with TestPipeline() as pipeline:
            called = pipeline | beam.Create(requests) | CachedCall(
                LLMCallHandler(LLM, IDENTITY, "stage"), str(tmp_path))
            assert_that(called["main"] | beam.Map(lambda answer: (answer.request.request_id, answer.source)),
                        equal_to(expected[label]), label="Sources")

    expected = {"first": [("p0::q0", "backend"), ("p1::q0", "backend"), ("p2::q0", "backend")],
                # The successes come from the cache; the failure was not cached, so it is called again.
                "second": [("p0::q0", "cache"), ("p1::q0", "backend"), ("p2::q0", "cache")]}
    run("first")
    run("second")
