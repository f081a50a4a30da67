"""A local server speaking the OpenAI chat-completions protocol as the `openai` client sends it, with seeded faults.

What vLLM, Ollama and llama.cpp's server answer at `POST /v1/chat/completions`: `choices[0].message.content`,
`finish_reason`, `usage.{prompt_tokens, completion_tokens}`. With `response_format` of type `json_schema` the answer
fits the schema (as those servers' guided decoding does); `supports_json_schema=False` refuses that format with a 400
naming it, like a server without it. Faults (FaultPlan: 429 with Retry-After, 5xx, timeouts, truncated bodies, answers
cut mid-JSON, schema violations) are drawn as in the fake Gemini server (tests/fakes/gemini_server.py), whose request
bookkeeping this one shares: `server.requests`, `max_in_flight`, `status_counts()`.

    with FakeOpenAIServer() as server:
        llm = OpenAICompatibleLLM("my-model", base_url=server.base_url)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fakes.gemini_server import (
    FakeGeminiServer,
    FaultPlan,
    RecordedRequest,
    choose_fault,
    example_from_schema,
)

CHAT_PATH = "/v1/chat/completions"


def default_answer(body: Mapping[str, Any]) -> str:
    """Answer text fitting the request's JSON schema, or an empty object when none was sent."""
    response_format = body.get("response_format") or {}
    schema = (response_format.get("json_schema") or {}).get("schema")
    return json.dumps(example_from_schema(schema))


def _chars_as_tokens(text: str) -> int:
    # About what a BPE tokenizer makes of English prose; tests check usage is summed, not a tokenizer.
    return max(1, len(text) // 4)


class FakeOpenAIServer(FakeGeminiServer):
    """OpenAI chat completions on 127.0.0.1:<free port>; `base_url` ends in /v1 as the `openai` client expects.

    `answer(body) -> text` may be swapped at any time, as may `faults`. With `api_key` set, other bearer tokens get a
    401.
    """

    def __init__(self, *, answer: Callable[[Mapping[str, Any]], str] = default_answer, faults: FaultPlan = FaultPlan(),
                 api_key: str | None = None, supports_json_schema: bool = True,
                 count_tokens: Callable[[str], int] = _chars_as_tokens):
        super().__init__(faults=faults, api_key=api_key, count_tokens=count_tokens)
        self.answer = answer
        self.supports_json_schema = supports_json_schema

    @property
    def base_url(self) -> str:
        return super().base_url + "/v1"

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)


def _completion(server: FakeOpenAIServer, body: Mapping[str, Any], fault: str | None) -> tuple[dict, tuple[int, int]]:
    prompt_tokens = sum(server.count_tokens(str(message.get("content", ""))) for message in body.get("messages", []))
    text, finish = server.answer(body), "stop"
    if fault == "schema_violation":
        text = json.dumps({"unexpected_field": ["not", "what", "was", "asked"]})
    elif fault == "truncated_answer":
        text, finish = text[: max(1, len(text) // 2)], "length"
    completion_tokens = server.count_tokens(text)
    payload = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    return payload, (prompt_tokens, completion_tokens)


def _error(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _handler_for(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        #: Records the request just before its answer's body is written (set per request by do_POST), so a test
        #: reading `server.requests` right after a call returns finds it there.
        _before_body: Callable[[], None] | None = None

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: Any, headers: Mapping[str, str] | None = None,
                  truncate: bool = False) -> None:
            data = json.dumps(payload).encode()
            if truncate:
                data = data[: len(data) // 2]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self._before_body is not None:
                self._before_body()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw_body = self.rfile.read(length) if length else b"{}"
            arrived = time.monotonic()
            index, draw = server._enter(hashlib.sha256(self.path.encode() + b"\x00" + raw_body).hexdigest())
            plan = server.faults
            status, fault, retry_after, tokens = 200, None, None, (0, 0)
            try:
                body = json.loads(raw_body or b"{}")
            except json.JSONDecodeError:
                body = {}
            recorded = False

            def record() -> RecordedRequest:
                return RecordedRequest(
                    index=index, api_version="v1", model=str(body.get("model", "")), method="chat.completions",
                    body=body, arrived=arrived, answered=time.monotonic(), status=status, fault=fault,
                    retry_after=retry_after, prompt_tokens=tokens[0], output_tokens=tokens[1])

            def record_now() -> None:
                nonlocal recorded
                if not recorded:
                    server._record(record())
                    recorded = True

            self._before_body = record_now
            try:
                server.sleep(plan.latency_s)
                if self.path.split("?", 1)[0] != CHAT_PATH:
                    status = 404
                    self._send(404, _error(f"no such route: POST {self.path}", "not_found_error"))
                    return
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    status = 401
                    self._send(401, _error("Incorrect API key provided.", "invalid_request_error"))
                    return
                response_format = (body.get("response_format") or {}).get("type")
                if response_format == "json_schema" and not server.supports_json_schema:
                    status = 400
                    self._send(400, _error("response_format type 'json_schema' is not supported",
                                           "invalid_request_error", "response_format"))
                    return
                fault = choose_fault(plan, draw, generate=True)
                if fault in ("empty_candidates", "safety", "prompt_blocked"):
                    fault = None  # Gemini-only answers: this protocol has no equivalent
                if fault == "timeout":
                    status = 0
                    record_now()
                    server.sleep(plan.hang_s)
                    self.close_connection = True
                    return
                if fault is not None and fault.startswith("http_"):
                    status = int(fault.removeprefix("http_"))
                    retry_after = plan.retry_after_s if status in (429, 503) else None
                    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
                    self._send(status, _error(f"fake failure {status}", "server_error"), headers)
                    return
                payload, tokens = _completion(server, body, fault)
                self._send(200, payload, truncate=fault == "truncated_body")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                server._leave(None if recorded else record())

    return Handler
