"""GeminiLLM and GeminiEmbedder through the real google-genai SDK, against the local fake Gemini server.

Every test talks HTTP to 127.0.0.1 only. Backoff and Retry-After values are fractions of a second so the file runs in
seconds; fault choices are seeded, so which request fails is the same on every run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import traceback
from collections import defaultdict

import numpy as np
import pytest
from google.genai import errors as genai_errors
from pydantic import BaseModel

from pipelines.clients.base import ChatMessage, GenerationConfig, TaskType
from pipelines.clients.factory import billable_output_tokens, build_embedder, build_llm
from pipelines.clients.gemini import (
    GeminiAuthError,
    GeminiEmbedder,
    GeminiError,
    GeminiLLM,
    GeminiRequestError,
    GeminiUnavailableError,
)
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from tests.fakes.gemini_server import FakeGeminiServer, FaultPlan, RecordedRequest, hash_vector

KEY = "test-key-7f3a9c-must-never-leak"
MAX_ATTEMPTS = 6


class Query(BaseModel):
    query: str
    score: int


@pytest.fixture(autouse=True)
def gemini_environment(monkeypatch):
    """A known key, nothing that could reroute the SDK (Vertex, API version) or send loopback traffic to a proxy."""
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    for name in (
        "GOOGLE_API_KEY",
        "GOOGLE_GENAI_USE_VERTEXAI",
        "GOOGLE_GENAI_USE_ENTERPRISE",
        "GOOGLE_GENAI_API_VERSION",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


def echo_prompt(body) -> str:
    """Answer with the last user turn as the query, so tests can tell which answer belongs to which request."""
    return json.dumps({"query": body["contents"][-1]["parts"][0]["text"], "score": 1})


def fast_options(server: FakeGeminiServer) -> dict:
    """Spec settings both backends take: the fake server's endpoint and retries short enough for tests."""
    return dict(
        backend="gemini",
        base_url=server.base_url,
        api_version="v1",
        timeout_s=2.0,
        max_attempts=MAX_ATTEMPTS,
        backoff_initial_s=0.01,
        backoff_max_s=1.0,
    )


def make_llm(server: FakeGeminiServer, **overrides) -> GeminiLLM:
    llm = build_llm(LLMSpec(**{**fast_options(server), "max_parse_attempts": 3, **overrides}))
    assert isinstance(llm, GeminiLLM)
    return llm


def make_embedder(server: FakeGeminiServer, **overrides) -> GeminiEmbedder:
    embedder = build_embedder(EmbedderSpec(**{**fast_options(server), "concurrency": 4, **overrides}))
    assert isinstance(embedder, GeminiEmbedder)
    return embedder


def prompt(i: int) -> list[ChatMessage]:
    return [ChatMessage("system", "Write one search query."), ChatMessage("user", f"passage number {i}")]


def by_prompt(records: list[RecordedRequest]) -> dict[str, list[RecordedRequest]]:
    groups: dict[str, list[RecordedRequest]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.arrived):
        groups[record.texts[-1]].append(record)
    return groups


# (1) the done-when test ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hint", ["retry_after_header", "retry_info_body"])
def test_rate_limited_calls_all_succeed_and_wait_as_told(fake_gemini_server, hint):
    server = fake_gemini_server
    server.generate = echo_prompt
    server.faults = FaultPlan(
        seed=3,
        errors={429: 0.2, 503: 0.1},
        retry_after_s=0.25,
        retry_after_header=hint == "retry_after_header",
        retry_info_body=hint == "retry_info_body",
    )
    n = 40
    with make_llm(server) as llm:
        results = llm.generate_many([prompt(i) for i in range(n)], Query, GenerationConfig(), concurrency=8)
        stats = llm.stats.as_dict()

    assert [result.ok for result in results] == [True] * n
    assert [result.value.query for result in results] == [f"passage number {i}" for i in range(n)]

    records = server.requests
    statuses = server.status_counts()
    assert statuses[429] > 0 and statuses[503] > 0, "the seeded plan should inject both faults"
    assert statuses[200] == n
    groups = by_prompt(records)
    assert len(groups) == n
    for i, result in enumerate(results):
        attempts = groups[f"passage number {i}"]
        assert len(attempts) == result.attempts <= MAX_ATTEMPTS
        assert attempts[-1].status == 200 and all(a.status in (429, 503) for a in attempts[:-1])
        for failed, retry in zip(attempts, attempts[1:], strict=False):
            # Server clock: the retry arrived no sooner than the announced delay after the failure was answered.
            assert failed.retry_after == 0.25
            assert retry.arrived - failed.answered >= failed.retry_after

    # Usage: what the client summed is exactly what the server reported on its successful answers.
    served_in = sum(r.prompt_tokens for r in records if r.status == 200)
    served_out = sum(r.output_tokens for r in records if r.status == 200)
    assert sum(result.usage.input_tokens for result in results) == served_in == stats["input_tokens"]
    assert sum(result.usage.output_tokens for result in results) == served_out == stats["output_tokens"]
    assert stats["calls"] == n and stats["failures"] == 0
    assert stats["calls"] + stats["retries"] == len(records)


def test_timeouts_are_retried(fake_gemini_server):
    server = fake_gemini_server
    server.generate = echo_prompt
    server.faults = FaultPlan(seed=1, timeout=0.4, hang_s=5.0)
    with make_llm(server, timeout_s=0.3) as llm:
        results = llm.generate_many([prompt(i) for i in range(6)], Query)
    assert all(result.ok for result in results)
    assert server.status_counts()[0] > 0, "some requests should have hung past the client timeout"
    assert llm.stats.retries == server.status_counts()[0]


def test_retries_run_out_with_a_clear_error(fake_gemini_server, caplog):
    caplog.set_level(logging.DEBUG)
    fake_gemini_server.faults = FaultPlan(errors={503: 1.0}, retry_after_s=0.01)
    with make_llm(fake_gemini_server, max_attempts=3) as llm:
        with pytest.raises(GeminiUnavailableError, match=r"503 UNAVAILABLE.*after 3 attempts") as raised:
            llm.generate(prompt(0), Query)
    assert raised.value.attempts == pickle.loads(pickle.dumps(raised.value)).attempts == 3
    assert len(fake_gemini_server.requests) == 3
    assert llm.stats.failures == 1 and llm.stats.retries == 2
    assert KEY not in "".join(traceback.format_exception(raised.value)) + caplog.text


# (2) embeddings -----------------------------------------------------------------------------------------------------


def test_embeddings_go_up_to_100_texts_a_request_in_order(fake_gemini_server):
    server = fake_gemini_server
    texts = [f"document {i} about topic {i % 3}" for i in range(250)]
    with make_embedder(server) as embedder:
        vectors = embedder.embed(texts, TaskType.RETRIEVAL_DOCUMENT, 256)

    assert vectors.shape == (250, 256) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    for text, vector in zip(texts, vectors, strict=True):  # order kept; values are the server's, normalized
        expected = np.asarray(hash_vector(text, "RETRIEVAL_DOCUMENT", 256), dtype=np.float32)
        np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), rtol=1e-5, atol=1e-6)

    records = server.requests
    assert all(record.method == "batchEmbedContents" for record in records)
    assert sorted(len(record.body["requests"]) for record in records) == [50, 100, 100]  # ceil(250 / 100) requests
    assert sorted(text for record in records for text in record.texts) == sorted(texts)
    for record in records:
        assert {entry["taskType"] for entry in record.body["requests"]} == {"RETRIEVAL_DOCUMENT"}
        assert {entry["outputDimensionality"] for entry in record.body["requests"]} == {256}
    assert embedder.stats.calls == 3


def test_an_answer_without_a_full_vector_for_every_text_fails_its_request_clearly(fake_gemini_server):
    server = fake_gemini_server
    answer = server.embed
    server.embed = lambda text, task_type, dimension: [] if text == "short" else answer(text, task_type, dimension)
    with make_embedder(server) as embedder:
        assert embedder.embed(["a", "b"], TaskType.RETRIEVAL_QUERY, 8).shape == (2, 8)
        with pytest.raises(GeminiError, match=r"expected 2 8-d embeddings for 2 texts, got embedding 1 with 0"):
            embedder.embed(["fine", "short"], TaskType.RETRIEVAL_QUERY, 8)
    assert embedder.stats.failures == 1


def test_embeddings_default_to_the_native_dimension_and_survive_faults(fake_gemini_server):
    server = fake_gemini_server
    server.faults = FaultPlan(seed=2, errors={429: 0.3}, retry_after_s=0.05, truncated_body=0.2)
    with make_embedder(server) as embedder:
        embedder.TEXTS_PER_REQUEST = 1  # one request per text: each draws its own fault
        vectors = embedder.embed(["alpha", "beta", "gamma", "delta"], TaskType.RETRIEVAL_QUERY)
        empty = embedder.embed([], TaskType.RETRIEVAL_QUERY, 64)
    assert vectors.shape == (4, 3072)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert empty.shape == (0, 64) and empty.dtype == np.float32
    faults = {record.fault for record in server.requests}
    assert {"http_429", "truncated_body"} <= faults
    assert embedder.stats.calls + embedder.stats.retries == len(server.requests)


# (3) answers that are not answers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error_part", "raw_check"),
    [
        ("truncated_body", "not complete JSON", lambda raw: raw.startswith('{"candidates"')),
        ("truncated_answer", "not JSON (finish reason MAX_TOKENS)", lambda raw: raw.startswith('{"query"')),
        ("schema_violation", "violates Query", lambda raw: "unexpected_field" in raw),
        ("empty_candidates", "no candidates", lambda raw: raw == ""),
        ("safety", "finish reason SAFETY", lambda raw: raw == ""),
        ("prompt_blocked", "prompt blocked: SAFETY", lambda raw: raw == ""),
    ],
)
def test_bad_answers_are_asked_again_then_returned_as_failures(fake_gemini_server, fault, error_part, raw_check):
    server = fake_gemini_server
    server.faults = FaultPlan(**{fault: 1.0})
    with make_llm(server, max_parse_attempts=3) as llm:
        result = llm.generate(prompt(0), Query, GenerationConfig(seed=7))
    assert not result.ok and result.value is None
    assert error_part in result.error and "after 3 asks" in result.error
    assert raw_check(result.raw), result.raw
    assert result.attempts == 3 == len(server.requests)
    # Each re-ask moves the seed on, so a seeded request is not asked the same question three times.
    assert [r.body["generationConfig"]["seed"] for r in server.requests] == [7, 8, 9]
    assert llm.stats.as_dict()["failures"] == 1


def test_a_bad_answer_then_a_good_one_succeeds(fake_gemini_server):
    server = fake_gemini_server
    server.faults = FaultPlan(seed=0, schema_violation=0.5)
    with make_llm(server, max_parse_attempts=5) as llm:
        results = llm.generate_many([prompt(i) for i in range(8)], Query)
    assert all(result.ok for result in results)
    assert any(result.attempts > 1 for result in results)
    # Tokens of the rejected answers were paid for too.
    records = server.requests
    assert sum(result.usage.output_tokens for result in results) == sum(r.output_tokens for r in records)


# (4) requests the service refuses -----------------------------------------------------------------------------------


def test_400_is_not_retried(fake_gemini_server):
    fake_gemini_server.faults = FaultPlan(errors={400: 1.0})
    with make_llm(fake_gemini_server) as llm:
        result = llm.generate(prompt(0), Query)
    assert not result.ok and "400 INVALID_ARGUMENT" in result.error
    assert result.attempts == 1 and len(fake_gemini_server.requests) == 1

    fake_gemini_server.reset()
    with make_embedder(fake_gemini_server) as embedder:
        with pytest.raises(GeminiRequestError, match="400 INVALID_ARGUMENT") as raised:
            embedder.embed(["x"], TaskType.CLASSIFICATION, 8)
    assert raised.value.status == 400
    assert pickle.loads(pickle.dumps(raised.value)).status == 400  # errors travel between Beam workers
    assert len(fake_gemini_server.requests) == 1


def test_404_raises_without_retrying(fake_gemini_server):
    fake_gemini_server.faults = FaultPlan(errors={404: 1.0})
    with make_llm(fake_gemini_server) as llm:
        with pytest.raises(GeminiRequestError, match="404 NOT_FOUND"):
            llm.generate(prompt(0), Query)
    assert len(fake_gemini_server.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_raise_at_once(fake_gemini_server, status):
    fake_gemini_server.faults = FaultPlan(errors={status: 1.0})
    with make_llm(fake_gemini_server) as llm:
        with pytest.raises(GeminiAuthError, match="GEMINI_API_KEY / GOOGLE_API_KEY") as raised:
            llm.generate(prompt(0), Query)
    assert len(fake_gemini_server.requests) == 1
    assert KEY not in str(raised.value)


# (5) the API key ----------------------------------------------------------------------------------------------------


def test_missing_key_names_both_variables(fake_gemini_server, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY")
    with pytest.raises(GeminiAuthError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        make_llm(fake_gemini_server)
    monkeypatch.setenv("GOOGLE_API_KEY", "   ")  # blank counts as missing
    with pytest.raises(GeminiAuthError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        make_embedder(fake_gemini_server)


def test_the_key_never_shows(caplog):
    caplog.set_level(logging.DEBUG)
    with FakeGeminiServer(api_key="the-right-key") as server:
        server.faults = FaultPlan(seed=5, errors={429: 0.5}, retry_after_s=0.01)
        with make_llm(server) as llm:
            texts = [repr(llm), str(llm), repr(llm.__dict__), repr(LLMSpec(backend="gemini"))]
            with pytest.raises(GeminiAuthError, match="rejected the request's credentials") as raised:
                llm.generate(prompt(0), Query)
            # A server message that quotes the key is redacted before it reaches our errors.
            quoting = genai_errors.ClientError(400, {"error": {"message": f"key {KEY} is odd", "status": "X"}})
            texts.append(llm._connection.describe(quoting))
        with make_embedder(server) as embedder:
            texts += [repr(embedder), repr(embedder.__dict__)]
            with pytest.raises(GeminiAuthError) as raised_embed:
                embedder.embed(["x"], TaskType.RETRIEVAL_QUERY, 8)
    for error in (raised.value, raised_embed.value):
        texts += [str(error), repr(error), "".join(traceback.format_exception(error))]
    texts.append(caplog.text)
    texts += [str(record.args) for record in caplog.records]
    assert all(KEY not in text for text in texts)
    assert "[redacted]" in texts[4]
    assert all(record.body for record in server.requests)  # the requests did reach the server


# (6) API version ----------------------------------------------------------------------------------------------------


def test_v1beta_works(fake_gemini_server):
    server = fake_gemini_server
    server.generate = echo_prompt
    with make_llm(server, api_version="v1beta") as llm:
        assert llm.generate(prompt(1), Query).value.query == "passage number 1"
    with make_embedder(server, api_version="v1beta") as embedder:
        assert embedder.embed(["x"], TaskType.RETRIEVAL_QUERY, 16).shape == (1, 16)
    assert [(r.api_version, r.method) for r in server.requests] == [
        ("v1beta", "generateContent"),
        ("v1beta", "batchEmbedContents"),
    ]


# (7) concurrency ----------------------------------------------------------------------------------------------------


def test_async_generate_many_keeps_order_and_bounds_concurrency(fake_gemini_server):
    server = fake_gemini_server
    server.generate = echo_prompt
    server.faults = FaultPlan(latency_s=0.05)
    with make_llm(server) as llm:
        results = asyncio.run(llm.agenerate_many([prompt(i) for i in range(12)], Query, concurrency=3))
    assert [result.value.query for result in results] == [f"passage number {i}" for i in range(12)]
    assert 1 < server.max_in_flight <= 3


def test_embed_bounds_concurrency(fake_gemini_server):
    fake_gemini_server.faults = FaultPlan(latency_s=0.05)
    with make_embedder(fake_gemini_server, concurrency=2) as embedder:
        embedder.embed([f"t{i}" for i in range(600)], TaskType.CLUSTERING, 8)  # 6 requests of 100 texts
    assert 1 < fake_gemini_server.max_in_flight <= 2


def test_sync_calls_work_inside_a_running_event_loop(fake_gemini_server):
    fake_gemini_server.generate = echo_prompt

    async def notebook_cell(llm: GeminiLLM):
        return llm.generate(prompt(4), Query)  # a sync call from async code, as in a notebook

    with make_llm(fake_gemini_server) as llm:
        assert asyncio.run(notebook_cell(llm)).value.query == "passage number 4"


# the request the SDK sends ------------------------------------------------------------------------------------------


def test_chat_turns_and_config_reach_the_server(fake_gemini_server):
    messages = [
        ChatMessage("system", "You write queries."),
        ChatMessage("user", "example passage"),
        ChatMessage("assistant", '{"query": "example", "score": 2}'),
        ChatMessage("user", "real passage"),
    ]
    with make_llm(fake_gemini_server, thinking_budget=0) as llm:
        result = llm.generate(messages, Query, GenerationConfig(temperature=0.7, max_output_tokens=64, seed=11))
    assert result.ok
    body = fake_gemini_server.requests[0].body
    assert body["systemInstruction"]["parts"] == [{"text": "You write queries."}]
    assert [content["role"] for content in body["contents"]] == ["user", "model", "user"]
    config = body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert set(config["responseSchema"]["properties"]) == {"query", "score"}
    assert (config["temperature"], config["maxOutputTokens"], config["seed"]) == (0.7, 64, 11)
    # google-genai 3.6 sends this one nested message in snake_case; the API's JSON parser accepts both spellings.
    assert config["thinkingConfig"] in ({"thinkingBudget": 0}, {"thinking_budget": 0})
    assert llm.model_version == llm.model_id == "gemini-2.5-flash"


def _thinking_budget(config: dict) -> int | None:
    # google-genai 3.6 sends this one nested message in snake_case; the API's JSON parser accepts both spellings.
    thinking = config.get("thinkingConfig") or {}
    return thinking.get("thinkingBudget", thinking.get("thinking_budget"))


@pytest.mark.parametrize(
    ("model", "requested", "thinking", "max_output_tokens"),
    [
        ("gemini-2.5-flash", None, 0, 64),  # default: thinking off, the answer's budget as is
        ("gemini-2.5-flash-lite", None, 0, 64),
        ("gemini-2.5-pro", None, 128, 64 + 128),  # cannot switch thinking off: its minimum, on top of the answer
        ("gemini-2.5-flash", 512, 512, 64 + 512),  # an explicit budget wins, and still never eats the answer's
        ("gemini-2.5-pro", -1, -1, 64 + 32768),  # dynamic thinking: room for the model's maximum
    ],
)
def test_thinking_never_eats_the_answer_budget(fake_gemini_server, model, requested, thinking, max_output_tokens):
    fake_gemini_server.generate = echo_prompt
    with make_llm(fake_gemini_server, model=model, thinking_budget=requested) as llm:
        assert llm.generate(prompt(1), Query, GenerationConfig(max_output_tokens=64)).ok
    (request,) = fake_gemini_server.requests
    assert request.model == model
    config = request.body["generationConfig"]
    assert (_thinking_budget(config), config["maxOutputTokens"]) == (thinking, max_output_tokens)
    spec = LLMSpec(backend="gemini", model=model, thinking_budget=requested)
    assert billable_output_tokens(spec, 64) == max_output_tokens  # what a budget planner must reserve


def test_models_without_a_known_thinking_range_get_no_thinking_config(fake_gemini_server):
    fake_gemini_server.generate = echo_prompt
    with make_llm(fake_gemini_server, model="gemini-2.0-flash") as llm:
        assert llm.generate(prompt(1), Query, GenerationConfig(max_output_tokens=64)).ok
    config = fake_gemini_server.requests[0].body["generationConfig"]
    assert "thinkingConfig" not in config and config["maxOutputTokens"] == 64


@pytest.mark.parametrize(
    ("model", "requested", "message"),
    [
        ("gemini-2.5-pro", 0, "cannot switch thinking off"),
        ("gemini-2.5-pro", 64, "128..32768"),
        ("gemini-2.5-flash", 10**6, "1..24576"),
        ("gemini-2.5-flash", -2, "-1 \\(dynamic\\)"),
        ("gemini-2.0-flash", -1, "maximum thinking budget is unknown"),
    ],
)
def test_impossible_thinking_budgets_fail_before_any_request(fake_gemini_server, model, requested, message):
    with pytest.raises(ValueError, match=message):
        make_llm(fake_gemini_server, model=model, thinking_budget=requested)
    assert not fake_gemini_server.requests
