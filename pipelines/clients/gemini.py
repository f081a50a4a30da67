"""Gemini backends through the google-genai SDK: `GeminiLLM` (structured JSON generation) and `GeminiEmbedder`.

What this module adds on top of the SDK:

1. Retries. The SDK's own retry is switched off (it is off by default, ignores Retry-After, and its aiohttp path retries
   connection errors on its own), so tenacity here is the only retry layer and its counts are true. 429, 500, 502, 503,
   504, timeouts and dropped connections are retried up to `max_attempts`; the wait is the server's Retry-After header
   or google.rpc.RetryInfo (Gemini sends the latter in 429 bodies), else exponential backoff with jitter, capped.
   Other 4xx are never retried.
2. Answer checking. An answer that is not JSON, violates the pydantic output model, has no candidate or was blocked is
   asked again up to `max_parse_attempts` times, then comes back as a failed `GenerationResult` keeping the raw text:
   a bad answer is data (a rejected row), an unreachable service is an exception (`GeminiUnavailableError`).
3. Bounded concurrency. `generate_many`/`agenerate_many` and `embed`/`aembed` run requests through the async client
   under a semaphore, results in input order.
4. Key hygiene. The key comes only from GOOGLE_API_KEY or GEMINI_API_KEY; it never appears in a repr, log record or
   exception text of ours (server messages are redacted too), and specs never hold it.

`model_version` is the model name: Gemini models are versioned by name (`gemini-2.5-flash` names one stable release;
a new release gets a new name). Moving aliases such as `gemini-flash-latest` therefore make poor cache keys.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import functools
import importlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import tenacity
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import BaseModel, ValidationError

from pipelines.clients.base import (
    LLM,
    ChatMessage,
    Embedder,
    GenerationConfig,
    GenerationResult,
    OutputT,
    TaskType,
    Usage,
    per_request,
    truncate_and_normalize,
)
from pipelines.clients.factory import gemini_output_token_limit, gemini_thinking_budget
from pipelines.clients.specs import (
    API_KEY_VARIABLES,
    DEFAULT_GEMINI_EMBEDDER,
    DEFAULT_GEMINI_LLM,
    EmbedderSpec,
    LLMSpec,
)

logger = logging.getLogger(__name__)

#: Status codes worth another attempt: rate limits and server-side failures. Other 4xx mean the request is wrong.
TRANSIENT_STATUS_CODES = frozenset({429, 500, 502, 503, 504})

#: Finish reasons meaning the answer was withheld: asking again may get an answer, the text we have is not one.
_BLOCKED_FINISH_REASONS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "MODEL_ARMOR"}
)

#: Full output size of the embedding models we know; other models must be given `native_dimension`.
_NATIVE_DIMENSIONS = {"gemini-embedding-001": 3072, "text-embedding-004": 768}

_T = TypeVar("_T")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Timeouts and dropped connections of whichever HTTP stack the installed SDK uses (httpx, httpx2 or aiohttp)."""
    found: list[type[BaseException]] = [TimeoutError, asyncio.TimeoutError]
    for module_name in ("httpx", "httpx2"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        # NetworkError: connect, read, write or close failed (ReadError is a connection reset mid-answer, e.g. when a
        # server's accept queue overflows under many concurrent new connections). RemoteProtocolError: the server
        # closed the connection without a (complete) answer.
        found += [module.TimeoutException, module.NetworkError, module.RemoteProtocolError]
    try:
        aiohttp = importlib.import_module("aiohttp")
    except ImportError:
        pass
    else:
        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


# --- errors -----------------------------------------------------------------------------------------------------------


class GeminiError(RuntimeError):
    """Base of every error this module raises; messages never contain the API key."""


class GeminiAuthError(GeminiError):
    """No API key in the environment, or the service rejected it (401, 403, 400 API_KEY_INVALID)."""


class GeminiRequestError(GeminiError):
    """The service refused the request itself (4xx other than auth and 429); retrying cannot help."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> Any:  # errors cross process boundaries on Beam workers
        return type(self), (str(self), self.status)


class GeminiUnavailableError(GeminiError):
    """Transient failures (429, 5xx, timeouts) went on through every allowed attempt."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts

    def __reduce__(self) -> Any:
        return type(self), (str(self), self.attempts)


# --- the API key ------------------------------------------------------------------------------------------------------


class _Secret:
    """Holds the API key so it cannot leak through repr, str, vars() dumps of its owner or pickling."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        return text.replace(self._value, "[redacted]") if self._value else text

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("the Gemini API key does not pickle: build Gemini clients in DoFn.setup(), from a spec")


def api_key_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The Gemini API key from GOOGLE_API_KEY or GEMINI_API_KEY; an error naming both when neither is set."""
    environ = os.environ if environ is None else environ
    for name in API_KEY_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            return value
    raise GeminiAuthError(
        "no Gemini API key: set GEMINI_API_KEY or GOOGLE_API_KEY in the environment "
        "(create a key at https://aistudio.google.com/apikey), or use the local backend"
    )


# --- retry policy -----------------------------------------------------------------------------------------------------


def _parse_duration(value: str) -> float | None:
    """google.protobuf.Duration in JSON ("17s", "0.250s") -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)s\s*", value)
    return float(match.group(1)) if match else None


def retry_delay_from_error(error: BaseException | None) -> float | None:
    """Seconds the server asked us to wait: the Retry-After header (seconds or HTTP date) or google.rpc.RetryInfo."""
    headers = getattr(getattr(error, "response", None), "headers", None)
    value = headers.get("retry-after") if headers is not None and hasattr(headers, "get") else None
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                moment = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                moment = None
            if moment is not None and moment.tzinfo is not None:
                return max(0.0, moment.timestamp() - time.time())
    # Gemini's own 429s carry the hint in the body: {"error": {"details": [{"@type": ".../google.rpc.RetryInfo",
    # "retryDelay": "17s"}]}}.
    body = getattr(error, "details", None)
    if isinstance(body, dict):
        details = body.get("error", body).get("details") if isinstance(body.get("error", body), dict) else None
        for detail in details if isinstance(details, list) else []:
            if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
                delay = _parse_duration(str(detail.get("retryDelay", "")))
                if delay is not None:
                    return delay
    return None


def is_transient(error: BaseException, *, truncated_body_is_transient: bool = False) -> bool:
    """Worth another attempt: 429 / 5xx from the service, a timeout or a dropped connection."""
    if isinstance(error, genai_errors.APIError):
        return error.code in TRANSIENT_STATUS_CODES
    if truncated_body_is_transient and isinstance(error, json.JSONDecodeError):
        return True
    return isinstance(error, _TRANSPORT_ERRORS)


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried. Attempts count the first request."""

    max_attempts: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    #: Jitter only; nothing depends on its sequence, so it is not seeded.
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 <= self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError(
                f"need 0 <= backoff_initial_s <= backoff_max_s, got {self.backoff_initial_s} and {self.backoff_max_s}"
            )

    def delay(self, attempt_number: int, error: BaseException | None) -> float:
        """Seconds to wait after failed attempt `attempt_number` (1-based)."""
        hinted = retry_delay_from_error(error)
        if hinted is not None:
            # The server knows when capacity returns: wait at least that long (up to the cap, so a bad header cannot
            # park a worker for hours), plus up to 10% so clients told the same delay do not come back in lockstep.
            base = min(hinted, self.backoff_max_s)
            return base + self.rng.uniform(0.0, 0.1 * base)
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt_number - 1))
        # Equal jitter: at least half the exponential step (so retries still back off), the rest random (so
        # concurrent callers spread out).
        return ceiling / 2 + self.rng.uniform(0.0, ceiling / 2)

    def wait(self, retry_state: tenacity.RetryCallState) -> float:
        """tenacity `wait=` callback."""
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        return self.delay(retry_state.attempt_number, error)


# --- request plumbing shared by both backends ------------------------------------------------------------------------


class _LoopThread:
    """A private event loop on a daemon thread; the sync API submits coroutines to it.

    Why not `asyncio.run` per call: it fails inside a running loop (notebooks, async callers), and an httpx async
    connection pool cannot move between event loops (google-genai before 3.x keeps one pool per client), so every
    async request of one client runs on this one loop.
    """

    def __init__(self, name: str):
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name=self._name, daemon=True)
                self._thread.start()
            return self._loop

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        loop = self._ensure_started()
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("sync Gemini call from the client's own event loop: await the async method instead")
        future: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: stop the requests still in flight
            raise

    def close(self, final: Callable[[], Awaitable[None]] | None = None) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if final is not None:

            async def _final() -> None:
                await final()

            try:
                asyncio.run_coroutine_threadsafe(_final(), loop).result(timeout=10)
            except Exception as error:  # closing must not fail the caller
                logger.debug("closing the Gemini async client failed: %s", type(error).__name__)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@dataclass
class _Counter:
    """HTTP requests made for one logical call, retries included."""

    requests: int = 0


async def _gather_in_order(coroutines: Sequence[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Results in input order; if one raises, the rest are cancelled (not left running) and the error propagates."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class _Connection:
    """One google-genai client, its event loop thread, the key and the retry policy; owned by one backend."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None,
        api_version: str | None,
        timeout_s: float,
        retry: RetryPolicy,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.model = model
        self.base_url = base_url
        self.api_version = api_version
        self.retry = retry
        self._key = _Secret(api_key_from_env())
        http_options = types.HttpOptions(
            base_url=base_url,
            api_version=api_version,
            timeout=max(1, round(timeout_s * 1000)),  # the SDK takes milliseconds
            # attempts=1: the SDK's retry off explicitly, which also stops its aiohttp path from retrying on its own.
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        # vertexai=False: GOOGLE_GENAI_USE_VERTEXAI in the environment must not reroute an API-key client.
        self.client = genai.Client(api_key=self._key.reveal(), vertexai=False, http_options=http_options)
        self.loop = _LoopThread(name=f"gemini-{model}")

    def describe(self, error: BaseException) -> str:
        """A short, key-free description of a failure for logs and error messages."""
        if isinstance(error, genai_errors.APIError):
            text = f"{error.code} {error.status or ''}".strip()
            if error.message:
                text += f": {error.message}"
        else:
            text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return self._key.redact(text)[:500]

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        sleep = retry_state.next_action.sleep if retry_state.next_action is not None else 0.0
        logger.info(
            "%s: %s; retry %d/%d in %.2f s",
            self.model,
            self.describe(error) if error is not None else "failed",
            retry_state.attempt_number,
            self.retry.max_attempts - 1,
            sleep,
        )

    def _translate(self, error: genai_errors.APIError, attempts: int) -> GeminiError:
        description = self.describe(error)
        code = error.code
        if code in TRANSIENT_STATUS_CODES:
            return GeminiUnavailableError(f"{self.model}: {description} (gave up after {attempts} attempts)", attempts)
        # Gemini answers a bad key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID, not 401.
        if code in (401, 403) or "API_KEY_INVALID" in json.dumps(error.details, default=str):
            return GeminiAuthError(
                f"{self.model}: the Gemini API rejected the request's credentials ({description}); "
                "check the key in GEMINI_API_KEY / GOOGLE_API_KEY and that it may use this model"
            )
        return GeminiRequestError(f"{self.model}: request refused ({description})", code)

    async def send(
        self,
        send: Callable[[], Awaitable[_T]],
        counter: _Counter,
        *,
        truncated_body_is_transient: bool,
    ) -> _T:
        """Await `send()`, retrying transient failures; every HTTP request made is counted in `counter`.

        Raises GeminiUnavailableError when retries run out, GeminiAuthError / GeminiRequestError for other 4xx.
        A truncated response body (json.JSONDecodeError from the SDK) propagates unless it is declared transient.
        """
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.retry.max_attempts),
            wait=self.retry.wait,
            retry=tenacity.retry_if_exception(
                functools.partial(is_transient, truncated_body_is_transient=truncated_body_is_transient)
            ),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    counter.requests += 1
                    return await send()
        except genai_errors.APIError as error:
            # `from None`: the SDK error holds the HTTP request (headers included); keep it out of tracebacks.
            raise self._translate(error, counter.requests) from None
        except (*_TRANSPORT_ERRORS, json.JSONDecodeError) as error:
            if isinstance(error, json.JSONDecodeError) and not truncated_body_is_transient:
                raise
            raise GeminiUnavailableError(
                f"{self.model}: {self.describe(error)} (gave up after {counter.requests} attempts)", counter.requests
            ) from None
        raise AssertionError("tenacity neither returned nor raised")  # pragma: no cover

    def close(self) -> None:
        # aclose/close exist in recent google-genai only; older clients free their pools when collected.
        self.loop.close(final=getattr(self.client.aio, "aclose", None))
        close_sync = getattr(self.client, "close", None)
        if close_sync is not None:
            close_sync()

    def __repr__(self) -> str:
        return f"_Connection(model={self.model!r}, base_url={self.base_url!r}, api_version={self.api_version!r})"


# --- generation -------------------------------------------------------------------------------------------------------


def to_gemini_contents(messages: Sequence[ChatMessage]) -> tuple[str | None, list[types.Content]]:
    """Our chat turns -> (system_instruction, contents): system -> system_instruction, user -> "user",
    assistant -> "model". Few-shot examples stay as alternating turns."""
    system_parts: list[str] = []
    contents: list[types.Content] = []
    for message in messages:
        if message.role == "system":
            system_parts.append(message.content)
        elif message.role in ("user", "assistant"):
            role = "user" if message.role == "user" else "model"
            contents.append(types.Content(role=role, parts=[types.Part(text=message.content)]))
        else:
            raise ValueError(f"unknown chat role {message.role!r}: expected 'system', 'user' or 'assistant'")
    if not contents:
        raise ValueError("messages hold no user or assistant turn: Gemini needs at least one")
    return ("\n\n".join(system_parts) if system_parts else None), contents


def usage_from_response(response: types.GenerateContentResponse) -> Usage:
    """Billed tokens: prompt in, candidates plus thinking out (thinking tokens are billed as output)."""
    metadata = response.usage_metadata
    if metadata is None:
        return Usage()
    output = (metadata.candidates_token_count or 0) + (metadata.thoughts_token_count or 0)
    return Usage(metadata.prompt_token_count or 0, output)


@dataclass(frozen=True)
class ParsedAnswer(Generic[OutputT]):
    """One generateContent response read against the output model: `value` or an `error`, always the raw text."""

    value: OutputT | None
    raw: str
    error: str | None
    usage: Usage


def _enum_name(value: Any) -> str:
    return str(getattr(value, "value", value))


def parse_generate_response(
    response: types.GenerateContentResponse, output_model: type[OutputT]
) -> ParsedAnswer[OutputT]:
    """Check a response: prompt not blocked, a candidate, not withheld, JSON, valid for `output_model`."""
    usage = usage_from_response(response)
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        return ParsedAnswer(None, "", f"prompt blocked: {_enum_name(feedback.block_reason)}", usage)
    if not response.candidates:
        return ParsedAnswer(None, "", "no candidates in the response", usage)
    candidate = response.candidates[0]
    finish = _enum_name(candidate.finish_reason) if candidate.finish_reason is not None else "unspecified"
    parts = (candidate.content.parts or []) if candidate.content is not None else []
    # Thought summaries are not the answer; `response.text` would also warn on non-text parts.
    raw = "".join(part.text for part in parts if part.text and not part.thought)
    if finish in _BLOCKED_FINISH_REASONS:
        return ParsedAnswer(None, raw, f"answer blocked: finish reason {finish}", usage)
    if not raw.strip():
        return ParsedAnswer(None, raw, f"empty answer (finish reason {finish})", usage)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        return ParsedAnswer(None, raw, f"answer is not JSON (finish reason {finish}): {error}", usage)
    try:
        value = output_model.model_validate(data)
    except ValidationError as error:
        summary = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or '<root>'}: {item['msg']}" for item in error.errors()[:5]
        )
        return ParsedAnswer(None, raw, f"answer violates {output_model.__name__}: {summary}", usage)
    return ParsedAnswer(value, raw, None, usage)


class GeminiLLM(LLM):
    """Structured generation with Gemini: JSON mode with the pydantic output model as response schema.

    `GenerationResult.attempts` counts the HTTP requests one call made (transient retries and re-asks together);
    `stats.retries` sums the requests beyond the first, so server-side requests == stats.calls + stats.retries.
    """

    supports_logprobs = False

    def __init__(
        self,
        model: str = DEFAULT_GEMINI_LLM,
        *,
        base_url: str | None = None,
        api_version: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        max_parse_attempts: int = 3,
        concurrency: int = 8,
        thinking_budget: int | None = None,
    ):
        super().__init__()
        if max_parse_attempts < 1:
            raise ValueError(f"max_parse_attempts must be at least 1, got {max_parse_attempts}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.model_id = model
        self.model_version = model
        self.max_parse_attempts = max_parse_attempts
        self.concurrency = concurrency
        #: What every request carries: the requested budget, else the model's default (see LLMSpec.thinking_budget).
        self.thinking_budget = gemini_thinking_budget(model, thinking_budget)
        self._connection = _Connection(
            model, base_url=base_url, api_version=api_version, timeout_s=timeout_s, retry=retry or RetryPolicy()
        )

    @classmethod
    def from_spec(cls, spec: LLMSpec) -> GeminiLLM:
        return cls(
            spec.model_name,
            base_url=spec.base_url,
            api_version=spec.api_version,
            timeout_s=spec.timeout_s,
            retry=RetryPolicy(spec.max_attempts, spec.backoff_initial_s, spec.backoff_max_s),
            max_parse_attempts=spec.max_parse_attempts,
            concurrency=spec.concurrency,
            thinking_budget=spec.thinking_budget,
        )

    def _request_config(
        self, output_model: type[BaseModel], config: GenerationConfig, system: str | None, ask: int
    ) -> types.GenerateContentConfig:
        # A seeded request asked again with the same seed would likely repeat the same bad answer; seed + ask keeps
        # re-asks different and still reproducible.
        seed = None if config.seed is None else config.seed + ask
        thinking = None if self.thinking_budget is None else types.ThinkingConfig(thinking_budget=self.thinking_budget)
        return types.GenerateContentConfig(
            system_instruction=system,
            response_mime_type="application/json",
            response_schema=output_model,
            temperature=config.temperature,
            # Gemini 2.5 counts thinking tokens inside max_output_tokens: the answer keeps its own budget on top.
            max_output_tokens=gemini_output_token_limit(self.model_id, config.max_output_tokens, self.thinking_budget),
            seed=seed,
            thinking_config=thinking,
        )

    async def agenerate(
        self,
        messages: Sequence[ChatMessage],
        output_model: type[OutputT],
        config: GenerationConfig = GenerationConfig(),
    ) -> GenerationResult[OutputT]:
        system, contents = to_gemini_contents(messages)
        counter = _Counter()
        usage = Usage()
        raw, error = "", "no attempt made"
        try:
            for ask in range(self.max_parse_attempts):
                send = functools.partial(
                    self._connection.client.aio.models.generate_content,
                    model=self.model_id,
                    contents=contents,
                    config=self._request_config(output_model, config, system, ask),
                )
                try:
                    response = await self._connection.send(send, counter, truncated_body_is_transient=False)
                except json.JSONDecodeError as truncated:
                    # The body broke off mid-JSON: keep what arrived as the raw answer and ask again.
                    raw, error = truncated.doc, f"response body is not complete JSON: {truncated.msg}"
                    continue
                answer = parse_generate_response(response, output_model)
                usage += answer.usage
                raw = answer.raw
                if answer.value is not None:
                    self.stats.record(usage=usage, retries=counter.requests - 1)
                    return GenerationResult(True, answer.value, raw, None, usage, counter.requests)
                error = answer.error or "invalid answer"
                logger.info("%s: %s (ask %d/%d)", self.model_id, error, ask + 1, self.max_parse_attempts)
        except GeminiRequestError as refused:
            self.stats.record(usage=usage, failed=True, retries=max(counter.requests - 1, 0))
            if refused.status != 400:
                raise
            # 400 is about this request (too long, unsupported content): a rejected row, not a stopped pipeline.
            return GenerationResult(False, None, raw, str(refused), usage, counter.requests)
        except GeminiError:
            self.stats.record(usage=usage, failed=True, retries=max(counter.requests - 1, 0))
            raise
        self.stats.record(usage=usage, failed=True, retries=counter.requests - 1)
        message = f"{error} (after {self.max_parse_attempts} asks)"
        return GenerationResult(False, None, raw, message, usage, counter.requests)

    def generate(
        self,
        messages: Sequence[ChatMessage],
        output_model: type[OutputT],
        config: GenerationConfig = GenerationConfig(),
    ) -> GenerationResult[OutputT]:
        return self._connection.loop.run(self.agenerate(messages, output_model, config))

    async def agenerate_many(
        self,
        requests: Sequence[Sequence[ChatMessage]],
        output_model: type[OutputT],
        config: GenerationConfig | Sequence[GenerationConfig] = GenerationConfig(),
        concurrency: int | None = None,
    ) -> list[GenerationResult[OutputT]]:
        """Results in request order, at most `concurrency` (default: the spec's) requests in flight; `config` is one
        for all requests or one per request."""
        limit = concurrency or self.concurrency
        semaphore = asyncio.Semaphore(limit)

        async def one(messages: Sequence[ChatMessage], each: GenerationConfig) -> GenerationResult[OutputT]:
            # Held across retries too: while a request backs off from a 429, the slot stays taken instead of letting
            # another request hit the rate limit.
            async with semaphore:
                return await self.agenerate(messages, output_model, each)

        configs = per_request(config, len(requests))
        return await _gather_in_order([one(messages, each) for messages, each in zip(requests, configs, strict=True)])

    def generate_many(
        self,
        requests: Sequence[Sequence[ChatMessage]],
        output_model: type[OutputT],
        config: GenerationConfig | Sequence[GenerationConfig] = GenerationConfig(),
        concurrency: int | None = None,
    ) -> list[GenerationResult[OutputT]]:
        return self._connection.loop.run(self.agenerate_many(requests, output_model, config, concurrency))

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> GeminiLLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GeminiLLM(model={self.model_id!r}, base_url={self._connection.base_url!r}, "
            f"api_version={self._connection.api_version!r})"
        )


# --- embeddings -------------------------------------------------------------------------------------------------------


class GeminiEmbedder(Embedder):
    """Embeddings from gemini-embedding-001, one text per request, float32 L2-normalized rows.

    `stats.calls` counts texts (one request each), `stats.retries` the extra requests transient failures cost.
    """

    def __init__(
        self,
        model: str = DEFAULT_GEMINI_EMBEDDER,
        *,
        base_url: str | None = None,
        api_version: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        concurrency: int = 8,
        native_dimension: int | None = None,
    ):
        super().__init__()
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        short_name = model.rsplit("/", 1)[-1]
        if native_dimension is None and short_name not in _NATIVE_DIMENSIONS:
            raise ValueError(
                f"native dimension of {model!r} unknown (known: {sorted(_NATIVE_DIMENSIONS)}): pass native_dimension"
            )
        self.model_id = model
        self.model_version = model
        self.native_dimension = native_dimension or _NATIVE_DIMENSIONS[short_name]
        self.concurrency = concurrency
        self._connection = _Connection(
            model, base_url=base_url, api_version=api_version, timeout_s=timeout_s, retry=retry or RetryPolicy()
        )

    @classmethod
    def from_spec(cls, spec: EmbedderSpec) -> GeminiEmbedder:
        return cls(
            spec.model_name,
            base_url=spec.base_url,
            api_version=spec.api_version,
            timeout_s=spec.timeout_s,
            retry=RetryPolicy(spec.max_attempts, spec.backoff_initial_s, spec.backoff_max_s),
            concurrency=spec.concurrency,
        )

    async def _embed_one(self, text: str, task_type: TaskType, dimension: int) -> np.ndarray:
        # One types.Content per request, never a list of strings: how the SDK sends a list depends on its version
        # and the model (3.6 turns a list into one batchEmbedContents entry per string for gemini-embedding-001,
        # but merges it into ONE multi-part content, hence one vector, for multimodal embedding models). One
        # Content is one entry in `requests[]` everywhere, and the count is checked below.
        send = functools.partial(
            self._connection.client.aio.models.embed_content,
            model=self.model_id,
            contents=types.Content(role="user", parts=[types.Part(text=text)]),
            config=types.EmbedContentConfig(task_type=TaskType(task_type).value, output_dimensionality=dimension),
        )
        counter = _Counter()
        try:
            response = await self._connection.send(send, counter, truncated_body_is_transient=True)
        except GeminiError:
            self.stats.record(failed=True, retries=max(counter.requests - 1, 0))
            raise
        embeddings = response.embeddings or []
        values = embeddings[0].values if len(embeddings) == 1 else None
        if not values or len(values) < dimension:
            self.stats.record(failed=True, retries=counter.requests - 1)
            got = f"{len(embeddings)} embeddings" if len(embeddings) != 1 else f"{len(values or [])} components"
            raise GeminiError(f"{self.model_id}: expected one {dimension}-d embedding for one text, got {got}")
        self.stats.record(retries=counter.requests - 1)
        return np.asarray(values[:dimension], dtype=np.float32)

    async def aembed(self, texts: Sequence[str], task_type: TaskType, dimension: int | None = None) -> np.ndarray:
        """Like `embed`, awaitable; at most `concurrency` requests in flight."""
        dimension = dimension or self.native_dimension
        if not 0 < dimension <= self.native_dimension:
            raise ValueError(f"dimension {dimension} is outside 1..{self.native_dimension} for {self.model_id}")
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts, got one str")
        if not texts:
            return np.zeros((0, dimension), dtype=np.float32)
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(text: str) -> np.ndarray:
            async with semaphore:
                return await self._embed_one(text, task_type, dimension)

        vectors = await _gather_in_order([one(text) for text in texts])
        # Gemini normalizes only full 3072-d output; truncated (Matryoshka) vectors come back with norms below 1.
        return truncate_and_normalize(np.stack(vectors), dimension)

    def embed(self, texts: Sequence[str], task_type: TaskType, dimension: int | None = None) -> np.ndarray:
        return self._connection.loop.run(self.aembed(texts, task_type, dimension))

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> GeminiEmbedder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GeminiEmbedder(model={self.model_id!r}, base_url={self._connection.base_url!r}, "
            f"api_version={self._connection.api_version!r})"
        )
