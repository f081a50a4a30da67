"""`OpenAICompatibleLLM`: structured generation from any server speaking OpenAI's chat-completions protocol (vLLM,
Ollama, llama.cpp's `llama-server`, OpenAI itself), through the official `openai` client.

What this module adds on top of the client, as pipelines/clients/gemini.py does for Gemini:

1. Retries: the client's own are off (`max_retries=0`); the shared policy of pipelines/clients/retry.py retries 429,
   5xx, timeouts and dropped connections, waiting as Retry-After asks. Other 4xx are never retried.
2. Structured output. `structured_output` says how the output model's JSON schema reaches the server:
   - "json_schema": as `response_format={"type": "json_schema", ...}`, which vLLM, llama.cpp's server, Ollama
     (0.5 and later) and OpenAI decode against (guided decoding);
   - "json_object": `{"type": "json_object"}` (JSON, any shape) with the schema in the system message;
   - "prompt": no response format, the schema in the system message;
   - "auto" (default): "json_schema", and if the server refuses it (a 400 naming `response_format`), "prompt" from
     then on for this client: the refusal costs one request, once.
   Whatever the format, the answer is validated against the output model and asked again up to `max_parse_attempts`
   times; a bad answer comes back as a failed `GenerationResult` keeping the raw text (a rejected row), an unreachable
   server as an exception naming its URL.
3. Bounded concurrency: `agenerate` is native async (one `AsyncOpenAI` client, on the private event loop of
   pipelines/clients/event_loop.py), `generate_many` keeps `concurrency` requests in flight.
4. Key hygiene: the key comes only from OPENAI_API_KEY, lives in a `Secret`, and is redacted from every message. A
   local server needs none; the client is then given the placeholder "no-key" (it refuses an empty one).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import openai
from pydantic import BaseModel, ValidationError

from pipelines.clients.base import (
    ChatMessage,
    GenerationConfig,
    GenerationResult,
    NetworkLLM,
    OutputT,
    Usage,
)
from pipelines.clients.event_loop import LoopThread
from pipelines.clients.retry import RequestCounter, RetryPolicy, retry_logger, status_code
from pipelines.clients.secret import Secret
from pipelines.clients.specs import OPENAI_API_KEY_VARIABLE, OPENAI_BASE_URL, StructuredOutput

logger = logging.getLogger(__name__)

#: What the client sends as the key to a server that needs none (the `openai` client refuses an empty key).
NO_KEY = "no-key"


class OpenAICompatibleError(RuntimeError):
    """Base of this module's errors; messages never contain the API key."""


class OpenAICompatibleAuthError(OpenAICompatibleError):
    """No key where one is needed, or the server refused it (401, 403)."""


class OpenAICompatibleRequestError(OpenAICompatibleError):
    """The server refused the request itself (a 4xx other than 400, 401, 403, 429): retrying cannot help."""


class OpenAICompatibleUnavailableError(OpenAICompatibleError):
    """Transient failures (429, 5xx, timeouts, refused connections) went on through every allowed attempt."""


def schema_instruction(output_model: type[BaseModel]) -> str:
    """What a server without a JSON-schema response format is told, appended to the system message."""
    schema = json.dumps(output_model.model_json_schema(), separators=(",", ":"))
    return f"Answer with one JSON object, nothing else, that validates against this JSON schema: {schema}"


def to_openai_messages(messages: Sequence[ChatMessage], instruction: str | None = None) -> list[dict[str, str]]:
    """Our chat turns as the protocol's; `instruction` joins the system message (or becomes one)."""
    turns = [{"role": message.role, "content": message.content} for message in messages]
    if instruction is None:
        return turns
    if turns and turns[0]["role"] == "system":
        turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{instruction}"}
    else:
        turns.insert(0, {"role": "system", "content": instruction})
    return turns


def parse_completion(completion: Any, output_model: type[OutputT]) -> tuple[OutputT | None, str, str | None, Usage]:
    """(value, raw text, error, usage) of one chat completion read against `output_model`."""
    usage = Usage()
    if completion.usage is not None:
        usage = Usage(completion.usage.prompt_tokens or 0, completion.usage.completion_tokens or 0)
    if not completion.choices:
        return None, "", "no choices in the response", usage
    choice = completion.choices[0]
    message = choice.message
    raw = (message.content or "") if message is not None else ""
    refusal = getattr(message, "refusal", None)
    if refusal:
        return None, raw, f"the model refused: {refusal}", usage
    if not raw.strip():
        return None, raw, f"empty answer (finish reason {choice.finish_reason})", usage
    try:
        return output_model.model_validate_json(raw), raw, None, usage
    except ValidationError as error:
        summary = "; ".join(f"{'.'.join(str(p) for p in item['loc']) or '<root>'}: {item['msg']}"
                            for item in error.errors()[:5])
        return None, raw, f"answer does not fit {output_model.__name__} (finish reason {choice.finish_reason}): " \
                          f"{summary}", usage


def _refuses_response_format(error: BaseException) -> bool:
    return status_code(error) == 400 and "response_format" in str(error)


class OpenAICompatibleLLM(NetworkLLM):
    supports_logprobs = False

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        concurrency: int = 8,
        max_parse_attempts: int = 3,
        structured_output: StructuredOutput = "auto",
    ):
        super().__init__()
        if not model:
            raise ValueError("the openai backend needs a model name (generate.llm.model)")
        if concurrency < 1 or max_parse_attempts < 1:
            raise ValueError(f"concurrency and max_parse_attempts must be >= 1, got {concurrency} and "
                             f"{max_parse_attempts}")
        self.model_id = model
        self.base_url = (base_url or OPENAI_BASE_URL).rstrip("/")
        self.model_version = f"{model}@{self.base_url}"
        self.concurrency = concurrency
        self.max_parse_attempts = max_parse_attempts
        self.retry = retry or RetryPolicy()
        self._format = "json_schema" if structured_output == "auto" else structured_output
        self._auto = structured_output == "auto"
        key = os.environ.get(OPENAI_API_KEY_VARIABLE, "").strip()
        if not key and base_url is None:
            raise OpenAICompatibleAuthError(
                f"no OpenAI API key: set {OPENAI_API_KEY_VARIABLE}, or point generate.llm.base_url at your own server")
        self._key = Secret(key or NO_KEY, "the OpenAI API key")
        self._client = openai.AsyncOpenAI(api_key=self._key.reveal(), base_url=self.base_url, timeout=timeout_s,
                                          max_retries=0)
        self._loop = LoopThread(name=f"openai-{model}")

    # --- one request ---

    def _request(self, messages: Sequence[ChatMessage], output_model: type[BaseModel], config: GenerationConfig,
                 ask: int) -> dict[str, Any]:
        arguments: dict[str, Any] = {"model": self.model_id, "temperature": config.temperature,
                                     "max_tokens": config.max_output_tokens}
        if config.seed is not None:
            # As for Gemini: the same seed asked again would likely repeat the same bad answer.
            arguments["seed"] = config.seed + ask
        if self._format == "json_schema":
            arguments["messages"] = to_openai_messages(messages)
            arguments["response_format"] = {"type": "json_schema", "json_schema": {
                "name": output_model.__name__, "schema": output_model.model_json_schema()}}
        else:
            arguments["messages"] = to_openai_messages(messages, schema_instruction(output_model))
            if self._format == "json_object":
                arguments["response_format"] = {"type": "json_object"}
        return arguments

    def _describe(self, error: BaseException) -> str:
        code = status_code(error)
        text = f"{code} {getattr(error, 'message', error)}" if code is not None else f"{type(error).__name__}: {error}"
        return self._key.redact(text)[:500]

    async def _send(self, arguments: dict[str, Any], counter: RequestCounter) -> Any:
        """One completion, transient failures retried; `counter` counts the HTTP requests made."""
        retrying = self.retry.retrying(truncated_body_is_transient=True, before_sleep=retry_logger(
            logger, lambda: f"{self.model_id} at {self.base_url}", self._describe, self.retry.max_attempts))
        try:
            async for attempt in retrying:
                with attempt:
                    counter.requests += 1
                    return await self._client.chat.completions.create(**arguments)
        except openai.APIStatusError as error:
            code = error.status_code
            where = f"{self.model_id} at {self.base_url}"
            if code in (401, 403):
                raise OpenAICompatibleAuthError(
                    f"{where}: the server refused the credentials ({self._describe(error)}); check "
                    f"{OPENAI_API_KEY_VARIABLE}") from None
            if code == 400:
                raise  # about this request: the caller turns it into a failed result (or a format fallback)
            if code in (429, 500, 502, 503, 504):
                raise OpenAICompatibleUnavailableError(
                    f"{where}: {self._describe(error)} (gave up after {counter.requests} attempts)") from None
            raise OpenAICompatibleRequestError(f"{where}: request refused ({self._describe(error)})") from None
        except (openai.APIConnectionError, json.JSONDecodeError) as error:
            raise OpenAICompatibleUnavailableError(f"{self.model_id} at {self.base_url}: {self._describe(error)} "
                                                   f"(gave up after {counter.requests} attempts)") from None
        raise AssertionError("tenacity neither returned nor raised")  # pragma: no cover

    async def agenerate(
        self,
        messages: Sequence[ChatMessage],
        output_model: type[OutputT],
        config: GenerationConfig = GenerationConfig(),
    ) -> GenerationResult[OutputT]:
        counter = RequestCounter()
        usage = Usage()
        raw, error = "", "no attempt made"
        ask = 0
        try:
            while ask < self.max_parse_attempts:
                try:
                    completion = await self._send(self._request(messages, output_model, config, ask), counter)
                except openai.BadRequestError as refused:
                    if self._auto and self._format == "json_schema" and _refuses_response_format(refused):
                        logger.warning("%s at %s refuses the JSON-schema response format; asking for JSON in the "
                                       "prompt from now on", self.model_id, self.base_url)
                        self._format = "prompt"
                        continue  # not an ask: the server never answered this one
                    self.stats.record(usage=usage, failed=True, retries=max(counter.requests - 1, 0))
                    # A 400 is about this request (too long, unsupported content): a rejected row.
                    return GenerationResult(False, None, raw, self._describe(refused), usage, counter.requests)
                value, raw, error, answer_usage = parse_completion(completion, output_model)
                usage += answer_usage
                if value is not None:
                    self.stats.record(usage=usage, retries=counter.requests - 1)
                    return GenerationResult(True, value, raw, None, usage, counter.requests)
                logger.info("%s: %s (ask %d/%d)", self.model_id, error, ask + 1, self.max_parse_attempts)
                ask += 1
        except OpenAICompatibleError:
            self.stats.record(usage=usage, failed=True, retries=max(counter.requests - 1, 0))
            raise
        self.stats.record(usage=usage, failed=True, retries=counter.requests - 1)
        return GenerationResult(False, None, raw, f"{error} (after {self.max_parse_attempts} asks)", usage,
                                counter.requests)

    def async_loop(self) -> LoopThread:
        return self._loop

    def close(self) -> None:
        self._loop.close(final=self._client.close)

    def __repr__(self) -> str:
        return f"OpenAICompatibleLLM(model={self.model_id!r}, base_url={self.base_url!r})"

