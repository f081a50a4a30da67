"""Gemini backends through the google-genai SDK: `GeminiLLM` (structured JSON generation) and `GeminiEmbedder`.

What this module adds on top of the SDK:

1. Retries. The SDK's own retry is switched off (it is off by default, ignores Retry-After, and its aiohttp path retries
   connection errors on its own), so the policy of `pipelines.clients.retry` is the only retry layer and its counts
   are true: 429, 500, 502, 503, 504, timeouts and dropped connections are retried up to `max_attempts`, waiting as
   the server asks (Gemini sends google.rpc.RetryInfo in 429 bodies) or with capped backoff. Other 4xx are never
   retried.
2. Answer checking. An answer that is not JSON, violates the pydantic output model, has no candidate or was blocked is
   asked again up to `max_parse_attempts` times, then comes back as a failed `GenerationResult` keeping the raw text:
   a bad answer is data (a rejected row), an unreachable service is an exception (`GeminiUnavailableError`).
3. Bounded concurrency. `generate_many`/`agenerate_many` and `embed`/`aembed` run requests through the async client
   under a semaphore, results in input order; the sync methods run them on the client's own event loop thread
   (`pipelines.clients.event_loop`).
4. Key hygiene. The key comes only from GOOGLE_API_KEY or GEMINI_API_KEY; it never appears in a repr, log record or
   exception text of ours (server messages are redacted too), and specs never hold it.

`model_version` is the model name: Gemini models are versioned by name (`gemini-2.5-flash` names one stable release;
a new release gets a new name). Moving aliases such as `gemini-flash-latest` therefore make poor cache keys.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import BaseModel, ValidationError

from pipelines.clients.base import (
    ChatMessage,
    Embedder,
    GenerationConfig,
    GenerationResult,
    NetworkLLM,
    OutputT,
    TaskType,
    Usage,
    truncate_and_normalize,
)
from pipelines.clients.event_loop import LoopThread, gather_in_order
from pipelines.clients.gemini_thinking import gemini_output_token_limit, gemini_thinking_budget
from pipelines.clients.retry import (
    TRANSIENT_STATUS_CODES,
    TRANSPORT_ERRORS,
    RequestCounter,
    RetryPolicy,
    retry_logger,
)
from pipelines.clients.secret import Secret
from pipelines.clients.specs import API_KEY_VARIABLES, DEFAULT_GEMINI_EMBEDDER, DEFAULT_GEMINI_LLM

logger = logging.getLogger(__name__)

#: Finish reasons meaning the answer was withheld: asking again may get an answer, the text we have is not one.
_BLOCKED_FINISH_REASONS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "MODEL_ARMOR"}
)

#: Full output size of the embedding models we know; other models must be given `native_dimension`.
_NATIVE_DIMENSIONS = {"gemini-embedding-001": 3072, "text-embedding-004": 768}

_T = TypeVar("_T")


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


# --- request plumbing shared by both backends ------------------------------------------------------------------------


@dataclass(frozen=True)
class GeminiEndpoint:
    """Where and how both Gemini backends send their requests."""

    #: None is Google's API; tests point it at the local fake server.
    base_url: str | None = None
    api_version: str | None = None
    timeout_s: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


class GeminiConnection:
    """One google-genai client, its event loop thread, the key and the retry policy; owned by one backend."""

    def __init__(self, model: str, endpoint: GeminiEndpoint):
        self.model = model
        self.endpoint = endpoint
        self.retry = endpoint.retry
        self._key = Secret(api_key_from_env(), "the Gemini API key")
        http_options = types.HttpOptions(
            base_url=endpoint.base_url,
            api_version=endpoint.api_version,
            timeout=max(1, round(endpoint.timeout_s * 1000)),  # the SDK takes milliseconds
            # attempts=1: the SDK's retry off explicitly, which also stops its aiohttp path from retrying on its own.
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        # vertexai=False: GOOGLE_GENAI_USE_VERTEXAI in the environment must not reroute an API-key client.
        self.client = genai.Client(api_key=self._key.reveal(), vertexai=False, http_options=http_options)
        self.loop = LoopThread(name=f"gemini-{model}")

    def describe(self, error: BaseException) -> str:
        """A short, key-free description of a failure for logs and error messages."""
        if isinstance(error, genai_errors.APIError):
            text = f"{error.code} {error.status or ''}".strip()
            if error.message:
                text += f": {error.message}"
        else:
            text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return self._key.redact(text)[:500]

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
        counter: RequestCounter,
        *,
        truncated_body_is_transient: bool,
    ) -> _T:
        """Await `send()`, retrying transient failures; every HTTP request made is counted in `counter`.

        Raises GeminiUnavailableError when retries run out, GeminiAuthError / GeminiRequestError for other 4xx.
        A truncated response body (json.JSONDecodeError from the SDK) propagates unless it is declared transient.
        """
        retrying = self.retry.retrying(
            truncated_body_is_transient=truncated_body_is_transient,
            before_sleep=retry_logger(logger, lambda: self.model, self.describe, self.retry.max_attempts),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    counter.requests += 1
                    return await send()
        except genai_errors.APIError as error:
            # `from None`: the SDK error holds the HTTP request (headers included); keep it out of tracebacks.
            raise self._translate(error, counter.requests) from None
        except (*TRANSPORT_ERRORS, json.JSONDecodeError) as error:
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
        return (
            f"GeminiConnection(model={self.model!r}, base_url={self.endpoint.base_url!r}, "
            f"api_version={self.endpoint.api_version!r})"
        )


class _ConnectedBackend:
    """What both backends share: the model (its name is its version), the requests in flight, and one
    `GeminiConnection`, closed with the backend (also on leaving a `with` block)."""

    def __init__(self, model: str, endpoint: GeminiEndpoint | None, concurrency: int):
        super().__init__()
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.model_id = model
        self.model_version = model
        self.concurrency = concurrency
        self._connection = GeminiConnection(model, endpoint or GeminiEndpoint())

    def async_loop(self) -> LoopThread:
        return self._connection.loop

    def close(self) -> None:
        self._connection.close()

    def __enter__(self: _Backend) -> _Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model_id!r}, base_url={self._connection.endpoint.base_url!r}, "
            f"api_version={self._connection.endpoint.api_version!r})"
        )


_Backend = TypeVar("_Backend", bound=_ConnectedBackend)


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


class GeminiLLM(_ConnectedBackend, NetworkLLM):
    """Structured generation with Gemini: JSON mode with the pydantic output model as response schema.

    `GenerationResult.attempts` counts the HTTP requests one call made (transient retries and re-asks together);
    `stats.retries` sums the requests beyond the first, so server-side requests == stats.calls + stats.retries.
    """

    supports_logprobs = False

    def __init__(
        self,
        model: str = DEFAULT_GEMINI_LLM,
        *,
        endpoint: GeminiEndpoint | None = None,
        concurrency: int = 8,
        max_parse_attempts: int = 3,
        thinking_budget: int | None = None,
    ):
        if max_parse_attempts < 1:
            raise ValueError(f"max_parse_attempts must be at least 1, got {max_parse_attempts}")
        super().__init__(model, endpoint, concurrency)
        self.max_parse_attempts = max_parse_attempts
        #: What every request carries: the requested budget, else the model's default (see LLMSpec.thinking_budget).
        self.thinking_budget = gemini_thinking_budget(model, thinking_budget)

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
        counter = RequestCounter()
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


# --- embeddings -------------------------------------------------------------------------------------------------------


class GeminiEmbedder(_ConnectedBackend, Embedder):
    """Embeddings from gemini-embedding-001 in batchEmbedContents requests of up to `TEXTS_PER_REQUEST` texts, float32
    L2-normalized rows.

    `stats.calls` counts requests, `stats.retries` the extra requests transient failures cost.
    """

    #: batchEmbedContents' limit on the entries of one request.
    TEXTS_PER_REQUEST = 100

    def __init__(
        self,
        model: str = DEFAULT_GEMINI_EMBEDDER,
        *,
        endpoint: GeminiEndpoint | None = None,
        concurrency: int = 8,
        native_dimension: int | None = None,
    ):
        short_name = model.rsplit("/", 1)[-1]
        if native_dimension is None and short_name not in _NATIVE_DIMENSIONS:
            raise ValueError(
                f"native dimension of {model!r} unknown (known: {sorted(_NATIVE_DIMENSIONS)}): pass native_dimension"
            )
        super().__init__(model, endpoint, concurrency)
        self.native_dimension = native_dimension or _NATIVE_DIMENSIONS[short_name]

    async def _embed_request(self, texts: Sequence[str], task_type: TaskType, dimension: int) -> np.ndarray:
        """One batchEmbedContents request for `texts`; its vectors, checked one per text."""
        # A list of types.Content, one per text, never a list of strings: how the SDK sends a list of strings depends
        # on its version and the model (3.6 sends one entry per string for gemini-embedding-001, but merges the list
        # into ONE multi-part content, hence one vector, for multimodal embedding models). One Content is one entry
        # of `requests[]` everywhere, and the count is checked below.
        send = functools.partial(
            self._connection.client.aio.models.embed_content,
            model=self.model_id,
            contents=[types.Content(role="user", parts=[types.Part(text=text)]) for text in texts],
            config=types.EmbedContentConfig(task_type=TaskType(task_type).value, output_dimensionality=dimension),
        )
        counter = RequestCounter()
        try:
            response = await self._connection.send(send, counter, truncated_body_is_transient=True)
        except GeminiError:
            self.stats.record(failed=True, retries=max(counter.requests - 1, 0))
            raise
        embeddings = response.embeddings or []
        short = [index for index, embedding in enumerate(embeddings) if len(embedding.values or []) < dimension]
        if len(embeddings) != len(texts) or short:
            self.stats.record(failed=True, retries=counter.requests - 1)
            got = (f"{len(embeddings)} embeddings" if len(embeddings) != len(texts)
                   else f"embedding {short[0]} with {len(embeddings[short[0]].values or [])} components")
            raise GeminiError(f"{self.model_id}: expected {len(texts)} {dimension}-d embeddings for {len(texts)} "
                              f"texts, got {got}")
        self.stats.record(retries=counter.requests - 1)
        return np.asarray([embedding.values[:dimension] for embedding in embeddings], dtype=np.float32)

    async def aembed(self, texts: Sequence[str], task_type: TaskType, dimension: int | None = None) -> np.ndarray:
        """Like `embed`, awaitable; requests of up to TEXTS_PER_REQUEST texts, at most `concurrency` in flight."""
        dimension = dimension or self.native_dimension
        if not 0 < dimension <= self.native_dimension:
            raise ValueError(f"dimension {dimension} is outside 1..{self.native_dimension} for {self.model_id}")
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts, got one str")
        if not texts:
            return np.zeros((0, dimension), dtype=np.float32)
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(chunk: Sequence[str]) -> np.ndarray:
            async with semaphore:
                return await self._embed_request(chunk, task_type, dimension)

        step = self.TEXTS_PER_REQUEST
        blocks = await gather_in_order([one(texts[start:start + step]) for start in range(0, len(texts), step)])
        # Gemini normalizes only full 3072-d output; truncated (Matryoshka) vectors come back with norms below 1.
        return truncate_and_normalize(np.concatenate(blocks), dimension)

    def embed(self, texts: Sequence[str], task_type: TaskType, dimension: int | None = None) -> np.ndarray:
        return self._connection.loop.run(self.aembed(texts, task_type, dimension))
