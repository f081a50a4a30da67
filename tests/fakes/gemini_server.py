"""A local server speaking the Gemini REST protocol as google-genai sends it, with seeded fault injection.

Endpoints (any API version segment, e.g. /v1 or /v1beta):

    POST /{version}/models/{model}:generateContent     -> candidates[].content.parts[].text, finishReason, usageMetadata
    POST /{version}/models/{model}:batchEmbedContents  -> embeddings[].values (one per entry of requests[])
    POST /{version}/models/{model}:embedContent        -> embedding.values

Tests point the real SDK at `server.base_url` (loopback only) and inspect `server.requests`, `server.status_counts()`
and `server.max_in_flight` afterwards. Faults are chosen by hashing (seed, request body, how often that body has been
seen), so which attempt of which request fails does not depend on thread scheduling.

    with FakeGeminiServer(faults=FaultPlan(errors={429: 0.3}, retry_after_s=0.2)) as server:
        llm = GeminiLLM(endpoint=GeminiEndpoint(base_url=server.base_url, api_version="v1"))

Benchmarks run it in a process of its own, so its request handling does not share a GIL with the client it measures:
`serve_over_stdio` prints the base URL as one JSON line, then answers `stats` / `reset` lines on stdin
(`python -m tests.fakes.gemini_server --latency 0.2` serves the default answers that way; `ServerProcess`
starts and drives that from the benchmark).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

from tests.fakes.gemini_batch_server import BatchPlan, BatchService

#: Google's canonical status names, as the error bodies carry them.
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_PATH = re.compile(r"^/(?P<version>[^/]+)/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$")
_GENERATE_ONLY_FAULTS = ("truncated_answer", "schema_violation", "empty_candidates", "safety", "prompt_blocked")
#: Gemini's answer to a wrong API key: 400, not 401, recognisable by its ErrorInfo reason.
_BAD_KEY_BODY = {
    "error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
        ],
    }
}


@dataclass(frozen=True)
class FaultPlan:
    """What fraction of requests fail, and how. Fractions add up to at most 1; the rest are answered normally."""

    seed: int = 0
    #: HTTP status -> fraction of requests answered with that error (429, 500, 503, 400, 403, ...).
    errors: Mapping[int, float] = field(default_factory=dict)
    #: Delay announced with 429/503 answers, in seconds (fractions allowed, to keep tests fast); None announces none.
    retry_after_s: float | None = 0.2
    #: Where the delay goes: the Retry-After header and/or a google.rpc.RetryInfo in the error body (what Gemini does).
    retry_after_header: bool = True
    retry_info_body: bool = False
    #: Added to every request before answering.
    latency_s: float = 0.0
    #: Fraction of requests that hang for `hang_s` (longer than the client timeout) and then drop the connection.
    timeout: float = 0.0
    hang_s: float = 5.0
    #: Fraction answered 200 with the JSON body cut in half (Content-Length matching the cut body).
    truncated_body: float = 0.0
    #: generateContent only: answer text cut mid-JSON with finishReason MAX_TOKENS.
    truncated_answer: float = 0.0
    #: generateContent only: valid JSON that matches no ordinary output model.
    schema_violation: float = 0.0
    #: generateContent only: `candidates: []`.
    empty_candidates: float = 0.0
    #: generateContent only: a candidate withheld with finishReason SAFETY.
    safety: float = 0.0
    #: generateContent only: promptFeedback.blockReason SAFETY and no candidates.
    prompt_blocked: float = 0.0

    def __post_init__(self) -> None:
        total = sum(fraction for _, fraction in self.kinds(generate=True))
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault fractions add up to {total:.3f} > 1")

    def kinds(self, *, generate: bool) -> list[tuple[str, float]]:
        """(fault name, fraction) in a fixed order; answer-level faults only apply to generateContent."""
        found = [(f"http_{status}", fraction) for status, fraction in sorted(self.errors.items())]
        found += [("timeout", self.timeout), ("truncated_body", self.truncated_body)]
        if generate:
            found += [(name, getattr(self, name)) for name in _GENERATE_ONLY_FAULTS]
        return [(name, fraction) for name, fraction in found if fraction > 0]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it. Times are `time.monotonic()` on the server."""

    index: int
    api_version: str
    model: str
    method: str
    body: dict[str, Any]
    arrived: float
    answered: float
    status: int
    fault: str | None
    #: Delay announced with this answer (Retry-After / RetryInfo), if any.
    retry_after: float | None
    #: Tokens this answer reported in usageMetadata (generateContent only).
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def texts(self) -> list[str]:
        """Every text part sent: contents for generateContent, the embedded texts for the embedding methods."""
        return _texts(self.method, self.body)


def _texts(method: str, body: Mapping[str, Any]) -> list[str]:
    if method == "batchEmbedContents":
        contents = [entry.get("content", {}) for entry in body.get("requests", [])]
    elif method == "embedContent":
        contents = [body.get("content", {})]
    else:
        contents = body.get("contents", [])
    return [part.get("text", "") for content in contents for part in content.get("parts", [])]


# --- default responders -----------------------------------------------------------------------------------------------


def example_from_schema(schema: Mapping[str, Any] | None) -> Any:
    """A small value that satisfies a response schema (Gemini `Schema` with upper-case types, or JSON schema)."""
    if not schema:
        return {}
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return example_from_schema(schema[key][0])
    kind = str(schema.get("type", "OBJECT")).upper()
    if kind == "OBJECT":
        properties = schema.get("properties", {})
        return {name: example_from_schema(sub) for name, sub in properties.items()}
    if kind == "ARRAY":
        # google-genai 3.6 sends some Schema fields in snake_case (min_items); the API accepts both spellings.
        min_items = schema.get("minItems", schema.get("min_items", 1))
        return [example_from_schema(schema.get("items"))] * max(1, int(min_items))
    if kind == "STRING":
        return "fake answer"
    if kind == "INTEGER":
        return int(schema.get("minimum", 1))
    if kind == "NUMBER":
        return float(schema.get("minimum", 0.5))
    if kind == "BOOLEAN":
        return True
    return None


def default_generate(body: Mapping[str, Any]) -> str:
    """Answer text that fits the request's response schema."""
    config = body.get("generationConfig", {})
    schema = config.get("responseSchema") or config.get("responseJsonSchema")
    return json.dumps(example_from_schema(schema))


def hash_vector(text: str, task_type: str | None, dimension: int) -> list[float]:
    """Deterministic pseudo-random vector per (text, task type). Not normalized: only 3072-d Gemini output is."""
    seed = hashlib.sha256(f"{task_type}\x00{text}".encode()).digest()
    values: list[float] = []
    counter = 0
    while len(values) < dimension:
        block = hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        values += [(byte - 127.5) / 64.0 for byte in block]
        counter += 1
    return values[:dimension]


def _words(text: str) -> int:
    return len(text.split())


# --- the server -------------------------------------------------------------------------------------------------------


class FakeGeminiServer:
    """Gemini REST on 127.0.0.1:<free port>. Start with `with FakeGeminiServer() as server:` or `start()`/`stop()`.

    `generate(body) -> answer text` and `embed(text, task_type, dimension) -> vector` may be swapped at any time, as
    may `faults`. With `api_key` set, other keys get Gemini's answer to a bad key (400, reason API_KEY_INVALID).
    `count_tokens(text)` sets the token counts usageMetadata reports (default: words).
    """

    def __init__(
        self,
        *,
        generate: Callable[[Mapping[str, Any]], str] = default_generate,
        embed: Callable[[str, str | None, int], Sequence[float]] = hash_vector,
        faults: FaultPlan = FaultPlan(),
        api_key: str | None = None,
        native_dimension: int = 3072,
        count_tokens: Callable[[str], int] = _words,
        batch_plan: BatchPlan | None = None,
    ):
        self.generate = generate
        #: The Files and Batch APIs, answering each line as `generate` / `embed` answer online.
        self.batch = BatchService(self, batch_plan or BatchPlan())
        self.count_tokens = count_tokens
        self.embed = embed
        self.faults = faults
        self.api_key = api_key
        self.native_dimension = native_dimension
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._seen: Counter[str] = Counter()
        self._arrivals = 0
        self._in_flight = 0
        self.max_in_flight = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> FakeGeminiServer:
        if self._httpd is not None:
            return self
        # Loopback only, port 0: the OS picks a free port, nothing outside this machine can connect.
        self._httpd = LoopbackHTTPServer(("127.0.0.1", 0), self.handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-gemini", daemon=True)
        self._thread.start()
        return self

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        """The request handler bound to this server: the protocol it speaks."""
        return _handler_for(self)

    def stop(self) -> None:
        self._stopping.set()  # releases hanging "timeout" requests
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> FakeGeminiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("FakeGeminiServer is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # what tests read

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def in_flight(self) -> int:
        """Requests being answered right now (a killed client's requests finish on the server side)."""
        with self._lock:
            return self._in_flight

    def status_counts(self) -> Counter[int]:
        return Counter(record.status for record in self.requests)

    def reset(self) -> None:
        """Forget recorded requests, fault history and the in-flight maximum."""
        with self._lock:
            self._requests.clear()
            self._seen.clear()
            self._arrivals = 0
            self.max_in_flight = 0

    # request handling (called from handler threads)

    def _enter(self, body_digest: str) -> tuple[int, float]:
        """Count the request in flight; return its arrival index and a uniform draw that depends only on the seed,
        the body and how often this exact body arrived before."""
        with self._lock:
            index = self._arrivals
            self._arrivals += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            occurrence = self._seen[body_digest]
            self._seen[body_digest] += 1
            seed = self.faults.seed
        draw = hashlib.sha256(f"{seed}\x00{body_digest}\x00{occurrence}".encode()).digest()
        return index, int.from_bytes(draw[:8], "big") / 2**64

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    def _leave(self, record: RecordedRequest | None) -> None:
        with self._lock:
            self._in_flight -= 1
            if record is not None:
                self._requests.append(record)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


class LoopbackHTTPServer(ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a client opening dozens of connections at once (concurrency 32) overflows
    # it, and the kernel resets some of them. The real service accepts them all.
    request_queue_size = 256


def choose_fault(plan: FaultPlan, draw: float, *, generate: bool) -> str | None:
    cumulative = 0.0
    for name, fraction in plan.kinds(generate=generate):
        cumulative += fraction
        if draw < cumulative:
            return name
    return None


def error_body(status: int, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    return {"error": error}


def recorded_request(
    index: int,
    match: re.Match[str] | None,
    method: str,
    body: dict[str, Any],
    arrived: float,
    status: int,
    fault: str | None,
    retry_after: float | None,
    tokens: tuple[int, int],
) -> RecordedRequest:
    return RecordedRequest(
        index=index,
        api_version=match.group("version") if match else "",
        model=match.group("model") if match else "",
        method=method,
        body=body,
        arrived=arrived,
        answered=time.monotonic(),
        status=status,
        fault=fault,
        retry_after=retry_after,
        prompt_tokens=tokens[0],
        output_tokens=tokens[1],
    )


def generate_payload(
    server: FakeGeminiServer, body: Mapping[str, Any], fault: str | None, model: str
) -> tuple[dict[str, Any], tuple[int, int]]:
    """A generateContent answer to `body` (with `fault` applied) and its (prompt, output) tokens."""
    # Token counts are words by default: enough for tests to check that usage is summed, not a tokenizer.
    count = server.count_tokens
    system = body.get("systemInstruction", {}).get("parts", [])
    prompt_tokens = sum(count(text) for text in _texts("generateContent", body)) + sum(
        count(part.get("text", "")) for part in system
    )
    usage = {"promptTokenCount": prompt_tokens}
    if fault == "prompt_blocked":
        return {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage}, (prompt_tokens, 0)
    if fault == "empty_candidates":
        return {"candidates": [], "usageMetadata": usage}, (prompt_tokens, 0)
    if fault == "safety":
        candidate = {
            "finishReason": "SAFETY",
            "index": 0,
            "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}],
        }
        return {"candidates": [candidate], "usageMetadata": usage}, (prompt_tokens, 0)
    text = server.generate(body)
    finish = "STOP"
    if fault == "schema_violation":
        text = json.dumps({"unexpected_field": ["not", "what", "was", "asked"]})
    elif fault == "truncated_answer":
        text, finish = text[: max(1, len(text) // 2)], "MAX_TOKENS"
    output_tokens = max(1, count(text))
    usage.update(candidatesTokenCount=output_tokens, totalTokenCount=prompt_tokens + output_tokens)
    candidate = {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": finish, "index": 0}
    payload = {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model}
    return payload, (prompt_tokens, output_tokens)


def embed_payload(server: FakeGeminiServer, body: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The answer of an embedding method (embedContent, batchEmbedContents) to `body`."""
    entries = body.get("requests", []) if method == "batchEmbedContents" else [body]
    embeddings = []
    for entry in entries:
        # The SDK sends the options flat on each entry (taskType, outputDimensionality) for this API.
        config = entry.get("embedContentConfig", {})
        task_type = entry.get("taskType", config.get("taskType"))
        dimension = int(
            entry.get("outputDimensionality", config.get("outputDimensionality")) or server.native_dimension
        )
        text = " ".join(part.get("text", "") for part in entry.get("content", {}).get("parts", []))
        embeddings.append({"values": [float(v) for v in server.embed(text, task_type, dimension)]})
    if method == "embedContent":
        return {"embedding": embeddings[0]}
    return {"embeddings": embeddings}


def _handler_for(server: FakeGeminiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 so the SDK's connection pool keeps connections alive, as against the real service.
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes; with Nagle on, the body waits for the client's delayed ACK
        # (~40 ms a request on Linux).
        disable_nagle_algorithm = True

        #: Called just before an answer's body is written (set per request by do_POST): the request is recorded
        #: before the client can have read the whole answer, so a test that reads `server.requests` right after
        #: a call returns always finds it there.
        _before_body: Callable[[], None] | None = None

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean; everything is in server.requests

        def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
            self._send_bytes(status, json.dumps(payload).encode(), headers)

        def _send_bytes(self, status: int, data: bytes, headers: Mapping[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self._before_body is not None:
                self._before_body()
            self.wfile.write(data)

        def _batch_service(self, verb: str, raw_body: bytes) -> bool:
            """Answer a Files or Batch API request (tests/fakes/gemini_batch_server.py); False if it is not one."""
            answer = server.batch.handle(verb, self.path, self.headers, raw_body)
            if answer is None:
                return False
            status, payload, headers = answer
            if isinstance(payload, bytes):
                self._send_bytes(status, payload, headers)
            else:
                self._send_json(status, payload, headers)
            return True

        def do_GET(self) -> None:
            if not self._batch_service("GET", b""):
                self._send_json(404, error_body(404, f"no such route: GET {self.path}"))

        def do_DELETE(self) -> None:
            if not self._batch_service("DELETE", b""):
                self._send_json(404, error_body(404, f"no such route: DELETE {self.path}"))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw_body = self.rfile.read(length) if length else b"{}"
            if self._batch_service("POST", raw_body):
                return
            arrived = time.monotonic()
            digest = hashlib.sha256(self.path.encode() + b"\x00" + raw_body).hexdigest()
            index, draw = server._enter(digest)
            plan = server.faults
            match = _PATH.match(self.path.split("?", 1)[0])
            method = match.group("method") if match else ""
            status, fault, retry_after, tokens = 200, None, None, (0, 0)
            recorded = False
            try:
                body = json.loads(raw_body or b"{}")
            except json.JSONDecodeError:
                body = {}

            def record_now() -> None:
                nonlocal recorded
                if not recorded:
                    server._record(
                        recorded_request(index, match, method, body, arrived, status, fault, retry_after, tokens))
                    recorded = True

            self._before_body = record_now
            try:
                server.sleep(plan.latency_s)
                if match is None or method not in ("generateContent", "batchEmbedContents", "embedContent"):
                    status = 404
                    self._send_json(404, error_body(404, f"no such method: POST {self.path}"))
                    return
                if server.api_key is not None and self.headers.get("x-goog-api-key") != server.api_key:
                    status = 400
                    self._send_json(400, _BAD_KEY_BODY)
                    return
                fault = choose_fault(plan, draw, generate=method == "generateContent")
                if fault == "timeout":
                    # Recorded now (status 0: no answer), not after the hang, so tests see it while it still hangs.
                    status = 0
                    server._record(recorded_request(index, match, method, body, arrived, 0, fault, None, (0, 0)))
                    recorded = True
                    server.sleep(plan.hang_s)
                    self.close_connection = True
                    return
                if fault is not None and fault.startswith("http_"):
                    status = int(fault.removeprefix("http_"))
                    retry_after = plan.retry_after_s if status in (429, 503) else None
                    self._send_error_fault(status, retry_after, plan)
                    return
                if method == "generateContent":
                    payload, tokens = generate_payload(server, body, fault, match.group("model"))
                else:
                    payload = embed_payload(server, body, method)
                data = json.dumps(payload).encode()
                if fault == "truncated_body":
                    data = data[: len(data) // 2]
                self._send_bytes(200, data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                server._leave(
                    None
                    if recorded
                    else recorded_request(index, match, method, body, arrived, status, fault, retry_after, tokens)
                )

        def _send_error_fault(self, status: int, retry_after: float | None, plan: FaultPlan) -> None:
            headers: dict[str, str] = {}
            details = None
            if retry_after is not None and plan.retry_after_header:
                headers["Retry-After"] = f"{retry_after:g}"
            if retry_after is not None and plan.retry_info_body:
                details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after:g}s"}]
            self._send_json(status, error_body(status, f"fake failure {status}", details), headers)

    return Handler


# --- serving another process ------------------------------------------------------------------------------------------


def request_stats(requests: Sequence[RecordedRequest]) -> dict[str, Any]:
    """Counts and timing of recorded requests, as plain JSON: per method and status, tokens, first arrival and last
    answer (`time.monotonic()`, which on Linux is one clock for every process of the machine)."""
    return {
        "requests": len(requests),
        "by_method": dict(Counter(record.method for record in requests)),
        "by_status": {str(status): count for status, count in Counter(record.status for record in requests).items()},
        "texts_embedded": sum(len(record.texts) for record in requests if record.method != "generateContent"),
        "prompt_tokens": sum(record.prompt_tokens for record in requests),
        "output_tokens": sum(record.output_tokens for record in requests),
        "first_arrival": min((record.arrived for record in requests), default=None),
        "last_answer": max((record.answered for record in requests), default=None),
    }


def serve_over_stdio(server: FakeGeminiServer, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Run `server` for a parent process: one JSON line `{"base_url": ...}`, then one JSON line per command read from
    `stdin`: `stats` (`request_stats`, `max_in_flight` and the server process's CPU seconds so far), `reset` (forget
    recorded requests). Stops at end of input or `stop`."""
    with server:
        print(json.dumps({"base_url": server.base_url}), file=stdout, flush=True)
        for line in stdin:
            command = line.strip()
            if command == "stats":
                answer = {**request_stats(server.requests), "max_in_flight": server.max_in_flight,
                          "cpu_seconds": time.process_time()}
            elif command == "reset":
                server.reset()
                answer = {"ok": True}
            elif command == "stop":
                break
            else:
                answer = {"error": f"unknown command {command!r}: expected stats, reset or stop"}
            print(json.dumps(answer), file=stdout, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake Gemini API on 127.0.0.1 for another process.")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--native-dimension", type=int, default=3072)
    parser.add_argument("--generate", help="answer text for generateContent bodies, as package.module:function")
    args = parser.parse_args()
    generate = default_generate
    if args.generate:
        module_name, _, attribute = args.generate.partition(":")
        generate = getattr(importlib.import_module(module_name), attribute)
    server = FakeGeminiServer(generate=generate, faults=FaultPlan(latency_s=args.latency),
                              native_dimension=args.native_dimension)
    serve_over_stdio(server)


class ServerProcess:
    """The fake server in a child process (`python -m tests.fakes.gemini_server`), for benchmarks.

        with ServerProcess(latency_s=0.2) as server:
            spec = LLMSpec(backend="gemini", base_url=server.base_url)
            ...
            server.stats()["by_method"]
    """

    def __init__(self, latency_s: float = 0.0, generate: str | None = None, cwd: str | None = None):
        command = [sys.executable, "-m", "tests.fakes.gemini_server", "--latency", str(latency_s)]
        if generate:
            command += ["--generate", generate]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the fake Gemini server exited with {self._process.wait()} before it served")
        self.base_url: str = json.loads(line)["base_url"]

    def _ask(self, command: str) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        return json.loads(self._process.stdout.readline())

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")

    def reset(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()  # end of input stops it
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
