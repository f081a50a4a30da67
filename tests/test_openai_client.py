"""The OpenAI-compatible backend through the real `openai` client against the fake chat-completions server
(tests/fakes/openai_server.py): structured output and its fallback, re-asks, retries, key hygiene, configuration and
cache identity."""

from __future__ import annotations

import logging

import pytest
from pydantic import BaseModel

from pipelines.clients.base import ChatMessage, GenerationConfig
from pipelines.clients.factory import build_llm, llm_identity
from pipelines.clients.openai_compatible import (
    OpenAICompatibleAuthError,
    OpenAICompatibleLLM,
    OpenAICompatibleUnavailableError,
    schema_instruction,
    to_openai_messages,
)
from pipelines.clients.retry import RetryPolicy
from pipelines.clients.specs import LLMSpec
from pipelines.config import load_run_config
from pipelines.config_loading import ConfigError
from tests.fakes.gemini_server import FaultPlan
from tests.fakes.openai_server import FakeOpenAIServer

KEY = "sk-openai-sentinel-key-0123456789"
FAST = RetryPolicy(max_attempts=6, backoff_initial_s=0.01, backoff_max_s=0.05)
MESSAGES = (ChatMessage("system", "You write queries."), ChatMessage("user", "Passage: heaps."))


class Query(BaseModel):
    task: str
    query: str


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def _llm(server: FakeOpenAIServer, **options) -> OpenAICompatibleLLM:
    return OpenAICompatibleLLM("served-model", base_url=server.base_url, retry=FAST, **options)


def test_the_schema_goes_as_the_json_schema_response_format_and_the_answer_is_validated():
    with FakeOpenAIServer() as server:
        llm = _llm(server)
        result = llm.generate(MESSAGES, Query, GenerationConfig(temperature=0.3, max_output_tokens=64, seed=7))
        llm.close()
    assert result.ok and result.value == Query(task="fake answer", query="fake answer")
    body = server.requests[0].body
    assert body["model"] == "served-model" and body["temperature"] == 0.3 and body["max_tokens"] == 64
    assert body["seed"] == 7
    assert body["response_format"]["json_schema"]["schema"] == Query.model_json_schema()
    assert body["messages"] == [{"role": "system", "content": "You write queries."},
                                {"role": "user", "content": "Passage: heaps."}]
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0


def test_a_server_without_json_schema_gets_the_schema_in_the_prompt_once_it_refuses(caplog):
    answers = iter(['{"task": "t", "query": "q1"}', '{"task": "t", "query": "q2"}'])
    with FakeOpenAIServer(supports_json_schema=False, answer=lambda body: next(answers)) as server:
        llm = _llm(server)
        with caplog.at_level(logging.WARNING):
            first = llm.generate(MESSAGES, Query)
            second = llm.generate(MESSAGES, Query)
        llm.close()
    assert first.value == Query(task="t", query="q1") and second.value == Query(task="t", query="q2")
    assert [record.status for record in server.requests] == [400, 200, 200]  # refused once, then never asked again
    system = server.requests[1].body["messages"][0]["content"]
    assert system.startswith("You write queries.") and schema_instruction(Query) in system
    assert "response_format" not in server.requests[1].body
    assert "refuses the JSON-schema response format" in caplog.text


@pytest.mark.parametrize("structured_output", ["json_object", "prompt"])
def test_chosen_formats_put_the_schema_in_the_prompt(structured_output):
    with FakeOpenAIServer(answer=lambda body: '{"task": "t", "query": "q"}') as server:
        llm = _llm(server, structured_output=structured_output)
        assert llm.generate(MESSAGES, Query).ok
        llm.close()
    body = server.requests[0].body
    assert body.get("response_format") == ({"type": "json_object"} if structured_output == "json_object" else None)
    assert schema_instruction(Query) in body["messages"][0]["content"]


def test_a_bad_answer_is_asked_again_then_returned_as_a_failure_keeping_the_raw_text():
    with FakeOpenAIServer(answer=lambda body: '{"task": "only a task"}') as server:
        llm = _llm(server, max_parse_attempts=2)
        result = llm.generate(MESSAGES, Query, GenerationConfig(seed=3))
        llm.close()
    assert not result.ok and result.raw == '{"task": "only a task"}' and "after 2 asks" in result.error
    assert [record.body["seed"] for record in server.requests] == [3, 4]  # a re-ask is a new draw
    assert llm.stats.failures == 1


def test_rate_limits_and_server_errors_are_retried_as_the_server_asks():
    faults = FaultPlan(seed=1, errors={429: 0.3, 503: 0.2}, truncated_body=0.1, retry_after_s=0.02)
    # Distinct requests: which attempt of which request fails then depends on the seed alone, not on arrival order.
    requests = [(ChatMessage("user", f"passage {index}"),) for index in range(30)]
    with FakeOpenAIServer(faults=faults) as server:
        llm = _llm(server)
        results = llm.generate_many(requests, Query, concurrency=4)
        llm.close()
    assert all(result.ok for result in results)
    counts = server.status_counts()
    assert counts[429] > 0 and counts[503] > 0 and counts[200] == 30 + sum(
        1 for record in server.requests if record.fault == "truncated_body")
    assert llm.stats.retries == len(server.requests) - 30
    assert server.max_in_flight <= 4


def test_other_client_errors_are_not_retried_and_an_unreachable_server_names_its_url():
    with FakeOpenAIServer(faults=FaultPlan(errors={400: 1.0})) as server:
        llm = _llm(server)
        result = llm.generate(MESSAGES, Query)
        llm.close()
    assert not result.ok and len(server.requests) == 1  # a 400 is about the request: a rejected row
    with FakeOpenAIServer() as server:
        url = server.base_url
    llm = OpenAICompatibleLLM("served-model", base_url=url, retry=RetryPolicy(2, 0.01, 0.02))
    with pytest.raises(OpenAICompatibleUnavailableError, match=url.replace(".", r"\.")):
        llm.generate(MESSAGES, Query)
    llm.close()


def test_the_key_is_sent_and_never_shown(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAIServer(api_key="another-key") as server:
        llm = _llm(server)
        with caplog.at_level(logging.DEBUG), pytest.raises(OpenAICompatibleAuthError) as refused:
            llm.generate(MESSAGES, Query)
        llm.close()
    assert KEY not in str(refused.value) and KEY not in caplog.text and KEY not in repr(llm)
    with FakeOpenAIServer(api_key=KEY) as server:
        llm = _llm(server)
        assert llm.generate(MESSAGES, Query).ok
        llm.close()


def test_openai_itself_needs_a_key_and_a_local_server_does_not():
    with pytest.raises(OpenAICompatibleAuthError, match="OPENAI_API_KEY"):
        OpenAICompatibleLLM("gpt-4o-mini")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        load_run_config(None, ["generate.llm.backend=openai", "generate.llm.model=gpt-4o-mini"])
    with pytest.raises(ConfigError, match="needs model"):
        load_run_config(None, ["generate.llm.backend=openai", "generate.llm.base_url=http://127.0.0.1:1/v1"])
    config = load_run_config(None, ["generate.llm.backend=openai", "generate.llm.model=m",
                                    "generate.llm.base_url=http://127.0.0.1:1/v1"])
    assert isinstance(build_llm(config.generate.llm), OpenAICompatibleLLM)


def test_the_cache_identity_names_the_server():
    one = LLMSpec(backend="openai", model="m", base_url="http://gpu-1:8000/v1")
    other = LLMSpec(backend="openai", model="m", base_url="http://gpu-2:8000/v1/")
    assert llm_identity(one) == ("m", "m@http://gpu-1:8000/v1")
    assert llm_identity(one) != llm_identity(other)
    assert llm_identity(LLMSpec(backend="openai", model="m")) == ("m", "m@https://api.openai.com/v1")


def test_messages_gain_the_instruction_in_their_system_turn():
    assert to_openai_messages([ChatMessage("user", "u")], "say JSON") == [
        {"role": "system", "content": "say JSON"}, {"role": "user", "content": "u"}]
    assert to_openai_messages(MESSAGES, "say JSON")[0]["content"] == "You write queries.\n\nsay JSON"
