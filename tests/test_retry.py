"""The Gemini clients' retry policy on its own, without a server: which failures are transient, where the server's
wait hint is read from, and how backoff grows and is capped. The retries themselves, through the SDK against the fake
server, are tested in test_gemini_client.py.
"""

from __future__ import annotations

import json

import pytest
from google.genai import errors as genai_errors

from pipelines.clients.retry import RetryPolicy, is_transient, retry_delay_from_error


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (genai_errors.ClientError(429, {"error": {}}), True),
        (genai_errors.ServerError(503, {"error": {}}), True),
        (genai_errors.ClientError(400, {"error": {}}), False),
        (genai_errors.ClientError(404, {"error": {}}), False),
        (TimeoutError(), True),
        (ValueError("not a transport error"), False),
    ],
)
def test_transient_failures_are_rate_limits_server_errors_and_transport_errors(error, transient):
    assert is_transient(error) is transient


def test_a_truncated_body_is_transient_only_when_declared_so():
    truncated = json.JSONDecodeError("Unterminated string", '{"embedding": {"val', 16)
    assert not is_transient(truncated)
    assert is_transient(truncated, truncated_body_is_transient=True)


class _Headers(dict):
    def get(self, name, default=None):
        return super().get(name.lower(), default)


class _Response:
    def __init__(self, headers):
        self.headers = _Headers(headers)


def test_retry_delay_sources():
    header = genai_errors.ClientError(429, {"error": {}}, _Response({"retry-after": "1.5"}))
    assert retry_delay_from_error(header) == 1.5
    body = genai_errors.ClientError(
        429,
        {"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}]}},
    )
    assert retry_delay_from_error(body) == 17.0
    assert retry_delay_from_error(genai_errors.ServerError(503, {"error": {}})) is None
    assert retry_delay_from_error(TimeoutError()) is None


def test_backoff_is_capped_and_hints_are_honoured_up_to_the_cap():
    policy = RetryPolicy(max_attempts=6, backoff_initial_s=0.5, backoff_max_s=4.0)
    plain = genai_errors.ServerError(503, {"error": {}})
    for attempt in range(1, 10):
        ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
        assert ceiling / 2 <= policy.delay(attempt, plain) <= ceiling
    hinted = genai_errors.ClientError(429, {"error": {}}, _Response({"retry-after": "2"}))
    assert 2.0 <= policy.delay(1, hinted) <= 2.2
    too_long = genai_errors.ClientError(429, {"error": {}}, _Response({"retry-after": "3600"}))
    assert 4.0 <= policy.delay(1, too_long) <= 4.4
