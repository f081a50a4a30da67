"""CallLLM: the cache join, shared identical requests, and the run's exact call and cost budget."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.budget import RunBudget, Spend, _PrefixWithinLimits, cheapest_prefix, keys_within_remaining
from pipelines.cache import LLM_CACHE, cache_files
from pipelines.clients.base import GenerationConfig
from pipelines.clients.factory import llm_identity
from pipelines.clients.specs import LLMSpec
from pipelines.llm_calls import CallLLM, LLMRequest, billed_asks, worst_case_micro_usd
from pipelines.model_access import ModelAccess
from prompts import get_prompt

SPEC = LLMSpec(backend="custom", model="tests.fakes.scripted_backends:grader")
GRADING = get_prompt("relevance_grading")


def _request(request_id: str, query: str) -> LLMRequest:
    return LLMRequest(request_id=request_id, prompt_name=GRADING.name, prompt_version=GRADING.version,
                      messages=GRADING.render(query=query, passage="json csv heap"), output_model=GRADING.output_model,
                      context=request_id)


REQUESTS = [_request("a", "what is json?"), _request("a-again", "what is json?"), _request("b", "what is csv?"),
            _request("c", "what is heap?"), _request("d", "what is zip?")]


def _assert_sources(cache_dir, max_calls, expected: dict[str, str]) -> None:
    budget = None if max_calls is None else RunBudget(max_calls=max_calls)
    with TestPipeline() as pipeline:
        called = pipeline | beam.Create(REQUESTS) | CallLLM(ModelAccess.llm(SPEC, str(cache_dir), budget), "test")
        assert_that(called["answers"] | beam.Map(lambda answer: (answer.request.request_id, answer.source)),
                    equal_to(list(expected.items())))


@pytest.mark.slow
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


def _count_sources(answers, label: str):
    return answers | f"{label}Sources" >> beam.Map(lambda answer: answer.source) | f"{label}Count" >> (
        beam.combiners.Count.PerElement())


@pytest.mark.slow
def test_later_stages_get_only_what_earlier_stages_left_of_the_run_budget(tmp_path):
    budget = RunBudget(max_calls=5)
    later = [_request(f"later-{index}", f"what is module {index}?") for index in range(4)]
    with TestPipeline() as pipeline:
        first = pipeline | "First" >> beam.Create(REQUESTS) | "CallFirst" >> CallLLM(
            ModelAccess.llm(SPEC, str(tmp_path), budget), "a")
        second = pipeline | "Second" >> beam.Create(later) | "CallSecond" >> CallLLM(
            ModelAccess.llm(SPEC, str(tmp_path), budget), "b")
        # Each stage reports its own usage: the paid calls and the ones the budget refused.
        usage = ((first["tallies"], second["tallies"]) | "Usage" >> beam.Flatten() | beam.Filter(
            lambda tally: tally[0][0] == "llm" and tally[0][2] in ("calls", "skipped_by_budget")))
        assert_that(usage, equal_to([(("llm", "a", "calls"), 4), (("llm", "a", "skipped_by_budget"), 0),
                                     (("llm", "b", "calls"), 1), (("llm", "b", "skipped_by_budget"), 3)]),
                    label="Usage")
        first, second = first["answers"], second["answers"]
        # The first stage has 4 distinct requests and calls them all; the second may call only 1 of its 4.
        assert_that(_count_sources(first, "First"), equal_to([("backend", 4), ("duplicate", 1)]), label="FirstStage")
        assert_that(_count_sources(second, "Second"), equal_to([("backend", 1), ("budget", 3)]), label="SecondStage")
        assert_that(budget.spent | beam.Map(lambda spent: spent.calls), equal_to([5]), label="RunSpend")


def test_cheapest_prefix_takes_the_smallest_keys_within_both_limits():
    candidates = [("c", 30), ("a", 10), ("d", 5), ("b", 20)]
    assert cheapest_prefix(candidates, None, None) == [("a", 10), ("b", 20), ("c", 30), ("d", 5)]
    assert cheapest_prefix(candidates, 2, None) == [("a", 10), ("b", 20)]
    # Cost stops at the first key that does not fit, even if a later one would: the choice must not depend on costs
    # of keys beyond the prefix, or workers seeing different subsets could disagree.
    assert cheapest_prefix(candidates, None, 59) == [("a", 10), ("b", 20)]
    assert cheapest_prefix(candidates, None, 60) == [("a", 10), ("b", 20), ("c", 30)]
    assert cheapest_prefix(candidates, 0, None) == []


def test_remaining_budget_subtracts_what_earlier_stages_spent():
    candidates = [("a", 10), ("b", 20), ("c", 30)]
    assert keys_within_remaining(candidates, Spend(calls=1, micro_usd=0), 3, None) == {"a", "b"}
    assert keys_within_remaining(candidates, Spend(calls=0, micro_usd=45), None, 75) == {"a", "b"}
    assert keys_within_remaining(candidates, Spend(calls=9, micro_usd=0), 3, None) == frozenset()
    assert keys_within_remaining(candidates, Spend(calls=0, micro_usd=100), None, 75) == frozenset()


def test_partial_prefixes_merge_to_the_prefix_of_everything():
    combine = _PrefixWithinLimits(max_calls=None, max_micro_usd=100)
    rows = [(f"key-{index:03d}", 7 + index % 5) for index in range(200)]
    parts = [rows[0::3], rows[1::3], rows[2::3]]
    accumulators = []
    for part in parts:
        accumulator = combine.create_accumulator()
        for row in part:
            accumulator = combine.add_input(accumulator, row)
        accumulators.append(accumulator)
    assert combine.extract_output(combine.merge_accumulators(accumulators)) == cheapest_prefix(rows, None, 100)


def test_worst_case_cost_bounds_the_prompt_and_the_output_cap_of_every_ask():
    request = LLMRequest(request_id="r", prompt_name="p", prompt_version="1",
                         messages=GRADING.render(query="what is json?", passage="json " * 300),
                         output_model=GRADING.output_model, config=GenerationConfig(max_output_tokens=100))
    prompt_bytes = sum(len(message.content.encode()) for message in request.messages)
    # gemini-2.5-flash, USD per million tokens = micro-USD per token; exact, then rounded up.
    input_price, output_price = Fraction(3, 10), Fraction(5, 2)
    one_ask = -(-prompt_bytes // 3) * input_price + 100 * output_price
    flash = LLMSpec(backend="gemini", model="gemini-2.5-flash", max_parse_attempts=1)
    assert worst_case_micro_usd(flash, request) == math.ceil(one_ask)
    assert worst_case_micro_usd(replace(flash, max_parse_attempts=3), request) == math.ceil(3 * one_ask)
    # Thinking is billed as output, on top of the answer's max_output_tokens.
    thinking = -(-prompt_bytes // 3) * input_price + (100 + 512) * output_price
    assert worst_case_micro_usd(replace(flash, thinking_budget=512), request) == math.ceil(thinking)
    assert worst_case_micro_usd(LLMSpec(backend="local", max_parse_attempts=3), request) == 0


def test_a_generate_call_is_planned_for_every_ask_it_may_make_a_score_call_for_one():
    generate = REQUESTS[0]
    score = LLMRequest(request_id="s", prompt_name="p", prompt_version="1", messages=generate.messages, mode="score",
                       continuations=("yes", "no"))
    assert billed_asks(LLMSpec(backend="gemini", max_parse_attempts=4), generate) == 4
    assert billed_asks(LLMSpec(backend="gemini", max_parse_attempts=4), score) == 1
