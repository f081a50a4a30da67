"""CallLLM: the cache join, shared identical requests, and the exact call budget."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.cache import LLM_CACHE, cache_files
from pipelines.clients.factory import LLMSpec, llm_identity
from pipelines.llm_calls import CallLLM, LLMRequest
from prompts import get_prompt

SPEC = LLMSpec(backend="custom", model="tests.scripted_backends:grader")
GRADING = get_prompt("relevance_grading")


def _request(request_id: str, query: str) -> LLMRequest:
    return LLMRequest(request_id=request_id, prompt_name=GRADING.name, prompt_version=GRADING.version,
                      messages=GRADING.render(query=query, passage="json csv heap"), output_model=GRADING.output_model,
                      context=request_id)


REQUESTS = [_request("a", "what is json?"), _request("a-again", "what is json?"), _request("b", "what is csv?"),
            _request("c", "what is heap?"), _request("d", "what is zip?")]


def _assert_sources(cache_dir, max_calls, expected: dict[str, str]) -> None:
    with TestPipeline() as pipeline:
        answers = pipeline | beam.Create(REQUESTS) | CallLLM(SPEC, "test", str(cache_dir), max_calls)
        assert_that(answers | beam.Map(lambda answer: (answer.request.request_id, answer.source)),
                    equal_to(list(expected.items())))


def test_budget_calls_a_deterministic_subset_and_the_cache_serves_the_rerun(tmp_path):
    keys = {request.request_id: request.cache_key(*llm_identity(SPEC)) for request in REQUESTS}
    allowed = set(sorted(set(keys.values()))[:2])  # the budget's deterministic choice: the smallest keys
    expected = {}
    for request_id, key in keys.items():
        first_of_key = request_id != "a-again"
        expected[request_id] = ("backend" if first_of_key else "duplicate") if key in allowed else "budget"
    _assert_sources(tmp_path, 2, expected)
    assert len(cache_files(str(tmp_path), LLM_CACHE)) >= 1

    # No budget now: what was paid for comes from the cache, the refused requests are called.
    _assert_sources(tmp_path, None, {
        request_id: "cache" if keys[request_id] in allowed else ("backend" if request_id != "a-again" else "duplicate")
        for request_id in keys})


def test_identical_requests_share_a_key_and_the_model_version_is_part_of_it():
    assert REQUESTS[0].cache_key("m", "v") == REQUESTS[1].cache_key("m", "v")
    assert REQUESTS[0].cache_key("m", "v") != REQUESTS[2].cache_key("m", "v")
    assert REQUESTS[0].cache_key("m", "v") != REQUESTS[0].cache_key("m", "v2")
