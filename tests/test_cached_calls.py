"""The one cached-call transform with both handlers: the DoFn lifecycle called directly (setup, process, finish_bundle,
teardown), and CachedCall on TestPipeline (misses called and cached, hits answered from the cache, failures never
cached)."""

from __future__ import annotations

import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.cache import EMBEDDING_CACHE, LLM_CACHE, CacheWriter, cache_files, read_cache_file
from pipelines.cached_calls import CachedCall, _CallInFlightFn, _CallMissesFn
from pipelines.clients.base import Embedder, TaskType
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.llm_calls import LLMCallHandler
from pipelines.model_access import ModelIdentity
from pipelines.sharded_search import unpack_vector
from pipelines.stages.embed_teacher import EmbedTeacherConfig, TeacherCallHandler
from pipelines.stages.generate_queries import GenerateQueriesConfig, build_requests
from tests.dofn_lifecycle import run_dofn
from tests.fakes.backends import keyword_embedder
from tests.fakes.gemini_server import FakeGeminiServer, FaultPlan, default_generate

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
    vectors = {output["id"]: unpack_vector(output["embedding"]) for output in outputs.main}
    expected = keyword_embedder().embed(["parse json"], TaskType.RETRIEVAL_QUERY)[0]
    assert sorted(vectors) == ["a", "b"] and vectors["a"] == pytest.approx(list(expected))
    assert len(outputs.tagged["sent"]) == 2
    # One flush, one file in each task type's partition.
    files = cache_files(str(tmp_path), EMBEDDING_CACHE)
    assert len(files) == 2 and {path.split("/")[-2].split("-")[0] for path in files} == {
        TaskType.RETRIEVAL_QUERY.value, TaskType.RETRIEVAL_DOCUMENT.value}
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


# --- requests always in flight (API backends) ------------------------------------------------------------------------


def test_in_flight_calls_never_wait_for_a_slow_request_and_cache_answers_while_it_runs(tmp_path, monkeypatch):
    OTHERS = 23  # noqa: N806 - a constant of this test
    monkeypatch.setenv("GEMINI_API_KEY", "in-flight-test-key")
    seen: dict[str, int] = {}

    def answer(body) -> str:
        text = body["contents"][-1]["parts"][0]["text"]
        if "SLOW" in text:
            # Held until every other request is answered and cached, which only a caller without batch barriers
            # gets to while this one is still in flight: batches of 8 x concurrency = 16 would stop at 15 others
            # (the timeout is a safety net, not a measurement).
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (
                    len(server.requests) < OTHERS or not cache_files(str(tmp_path), LLM_CACHE)):
                time.sleep(0.01)
            seen.update(others_answered=len(server.requests), cache_files=len(cache_files(str(tmp_path), LLM_CACHE)))
        return default_generate(body)

    with FakeGeminiServer(generate=answer) as server:
        spec = LLMSpec(backend="gemini", base_url=server.base_url, concurrency=2, timeout_s=30)
        handler = LLMCallHandler(spec, IDENTITY, "stage")
        handler.flush_seconds = 0.05
        requests = _requests("SLOW passage.", *(f"Passage number {index}." for index in range(OTHERS)))
        batches = [[(handler.key(request), [request])] for request in requests]
        called = run_dofn(_CallInFlightFn(handler, str(tmp_path)), batches, None)

    assert seen["others_answered"] == OTHERS and seen["cache_files"] >= 1
    assert sorted(answer.request.request_id for answer in called.main) == sorted(r.request_id for r in requests)
    assert all(answer.ok and answer.source == "backend" for answer in called.main)
    assert called.tallies[("llm", "stage", "calls")] == OTHERS + 1
    assert server.max_in_flight == 2
    entries = [row["key"] for path in cache_files(str(tmp_path), LLM_CACHE)
               for row in read_cache_file(path, LLM_CACHE).to_pylist()]
    assert sorted(entries) == sorted(handler.key(request) for request in requests)


def test_in_flight_teacher_embeds_and_rejects_a_failed_request_uncached(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "in-flight-test-key")
    items = [{"id": f"t{index}", "text": f"text {index}", "task_type": TaskType.RETRIEVAL_QUERY.value}
             for index in range(5)]
    with FakeGeminiServer() as server:
        spec = EmbedderSpec(backend="gemini", base_url=server.base_url, concurrency=2)
        handler = TeacherCallHandler("embed", spec, IDENTITY, EmbedTeacherConfig(batch_size=2, dimension=8))
        assert handler.in_flight == 2
        batches = [[(handler.key(item), [item]) for item in items[start:start + 2]] for start in range(0, 5, 2)]
        embedded = run_dofn(_CallInFlightFn(handler, str(tmp_path)), batches, None)
        server.faults = FaultPlan(errors={400: 1.0})
        failed = run_dofn(_CallInFlightFn(handler, str(tmp_path / "failed")), batches, None)
    assert sorted(output["id"] for output in embedded.main) == [item["id"] for item in items]
    assert sorted(len(record.body["requests"]) for record in server.requests if record.status == 200) == [1, 2, 2]
    assert sorted(row["record_id"] for row in failed.tagged["rejected"]) == [item["id"] for item in items]
    assert {row["reason"] for row in failed.tagged["rejected"]} == {"embedding_failed"}
    assert cache_files(str(tmp_path / "failed"), EMBEDDING_CACHE) == []


def test_the_cache_writer_flushes_by_count_and_by_age(tmp_path):
    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    def files() -> int:
        return len(cache_files(str(tmp_path), LLM_CACHE))

    def entry(key: str) -> dict:
        return {"key": key, "model_id": "m", "model_version": "1", "prompt_name": "p", "prompt_version": "1",
                "response_json": "{}", "raw_answer": "{}", "input_tokens": 1, "output_tokens": 1}

    clock = Clock()
    writer = CacheWriter(str(tmp_path), LLM_CACHE, flush_every=3, flush_seconds=5.0, clock=clock)
    writer.add(entry("a"))
    writer.add(entry("b"))
    assert files() == 0
    writer.add(entry("c"))  # the third entry: by count
    assert files() == 1
    writer.add(entry("d"))
    clock.now = 4.9
    writer.flush_if_due()
    assert files() == 1
    clock.now = 5.0  # the oldest buffered entry has waited 5 s: written while the caller waits on slow answers
    writer.flush_if_due()
    assert files() == 2
