"""The two small interfaces every backend implements: `LLM` and `Embedder`.

Pipeline stages only ever talk to these, so Gemini (production), local transformers models (offline) and the test fakes
are interchangeable. Results are plain frozen dataclasses: they pickle for Beam and carry the raw answer so a bad LLM
answer becomes a rejected row, not an exception.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import numpy as np
from pydantic import BaseModel

from pipelines.clients.event_loop import LoopThread, gather_in_order

OutputT = TypeVar("OutputT", bound=BaseModel)


class TaskType(str, enum.Enum):
    """Embedding task types, named as gemini-embedding-001 names them."""

    RETRIEVAL_QUERY = "RETRIEVAL_QUERY"
    RETRIEVAL_DOCUMENT = "RETRIEVAL_DOCUMENT"
    SEMANTIC_SIMILARITY = "SEMANTIC_SIMILARITY"
    CLASSIFICATION = "CLASSIFICATION"
    CLUSTERING = "CLUSTERING"
    QUESTION_ANSWERING = "QUESTION_ANSWERING"
    FACT_VERIFICATION = "FACT_VERIFICATION"
    CODE_RETRIEVAL_QUERY = "CODE_RETRIEVAL_QUERY"


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class GenerationConfig:
    temperature: float = 0.0
    max_output_tokens: int = 256
    seed: int | None = None


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens)


@dataclass(frozen=True)
class GenerationResult(Generic[OutputT]):
    """One structured-generation call. `value` is set iff `ok`; `raw` is always the model's last raw answer."""

    ok: bool
    value: OutputT | None
    raw: str
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    attempts: int = 1


@dataclass
class CallStats:
    """Counters a client keeps so runs (and tests) can prove what was called. Thread-safe."""

    calls: int = 0
    failures: int = 0
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, *, usage: Usage = Usage(), failed: bool = False, retries: int = 0) -> None:
        with self._lock:
            self.calls += 1
            self.failures += int(failed)
            self.retries += retries
            self.input_tokens += usage.input_tokens
            self.output_tokens += usage.output_tokens

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                "calls": self.calls,
                "failures": self.failures,
                "retries": self.retries,
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
            }


class LLM(abc.ABC):
    """Structured generation and log-probability scoring."""

    #: Hub id, path or API model name; part of every cache key.
    model_id: str
    #: Changes whenever the same model_id could answer differently (weights revision, quantization).
    model_version: str
    #: Whether `score` is available (local models); API models grade through `generate` instead.
    supports_logprobs: bool = False

    def __init__(self) -> None:
        self.stats = CallStats()

    @abc.abstractmethod
    def generate(
        self,
        messages: Sequence[ChatMessage],
        output_model: type[OutputT],
        config: GenerationConfig = GenerationConfig(),
    ) -> GenerationResult[OutputT]:
        """Answer `messages` with an instance of `output_model`, or a failed result that keeps the raw answer."""

    def score(self, messages: Sequence[ChatMessage], continuations: Sequence[str]) -> list[float]:
        """Total log-probability of each continuation as the assistant's answer to `messages`."""
        raise NotImplementedError(f"{type(self).__name__} ({self.model_id}) gives no log-probabilities")

    async def agenerate(
        self,
        messages: Sequence[ChatMessage],
        output_model: type[OutputT],
        config: GenerationConfig = GenerationConfig(),
    ) -> GenerationResult[OutputT]:
        return await asyncio.to_thread(self.generate, messages, output_model, config)

    def generate_many(
        self,
        requests: Sequence[Sequence[ChatMessage]],
        output_model: type[OutputT],
        config: GenerationConfig | Sequence[GenerationConfig] = GenerationConfig(),
        concurrency: int = 1,
    ) -> list[GenerationResult[OutputT]]:
        """Results in request order; `config` is one for all requests or one per request (sampled candidates each have
        their own seed). This default answers one by one; backends override it to answer several at once."""
        configs = per_request(config, len(requests))
        return [self.generate(messages, output_model, each) for messages, each in zip(requests, configs, strict=True)]

    def async_loop(self) -> LoopThread | None:
        """The event loop `agenerate` runs on, for callers that keep many requests in flight (API backends, whose
        calls wait on the network); None for a backend that answers a batch at once itself (`generate_many`)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to release
        """Release clients or models."""


class NetworkLLM(LLM):
    """An LLM behind an API (Gemini, OpenAI-compatible servers): `agenerate` is native async and runs on the backend's
    own event loop (`async_loop`); the sync methods and `generate_many` are built on it, with at most `concurrency`
    requests in flight."""

    concurrency: int

    @abc.abstractmethod
    async def agenerate(
        self,
        messages: Sequence[ChatMessage],
        output_model: type[OutputT],
        config: GenerationConfig = GenerationConfig(),
    ) -> GenerationResult[OutputT]:
        """One request, asked again while the answer does not validate; never raises for a bad answer."""

    @abc.abstractmethod
    def async_loop(self) -> LoopThread: ...

    def generate(
        self,
        messages: Sequence[ChatMessage],
        output_model: type[OutputT],
        config: GenerationConfig = GenerationConfig(),
    ) -> GenerationResult[OutputT]:
        return self.async_loop().run(self.agenerate(messages, output_model, config))

    async def agenerate_many(
        self,
        requests: Sequence[Sequence[ChatMessage]],
        output_model: type[OutputT],
        config: GenerationConfig | Sequence[GenerationConfig] = GenerationConfig(),
        concurrency: int | None = None,
    ) -> list[GenerationResult[OutputT]]:
        """Results in request order, at most `concurrency` (default: the backend's) requests in flight; `config` is one
        for all requests or one per request."""
        semaphore = asyncio.Semaphore(concurrency or self.concurrency)

        async def one(messages: Sequence[ChatMessage], each: GenerationConfig) -> GenerationResult[OutputT]:
            # Held across retries too: while a request backs off from a 429, the slot stays taken instead of letting
            # another request hit the rate limit.
            async with semaphore:
                return await self.agenerate(messages, output_model, each)

        configs = per_request(config, len(requests))
        return await gather_in_order([one(messages, each) for messages, each in zip(requests, configs, strict=True)])

    def generate_many(
        self,
        requests: Sequence[Sequence[ChatMessage]],
        output_model: type[OutputT],
        config: GenerationConfig | Sequence[GenerationConfig] = GenerationConfig(),
        concurrency: int | None = None,
    ) -> list[GenerationResult[OutputT]]:
        return self.async_loop().run(self.agenerate_many(requests, output_model, config, concurrency))


def per_request(config: GenerationConfig | Sequence[GenerationConfig], count: int) -> list[GenerationConfig]:
    """`generate_many`'s config as one per request."""
    if isinstance(config, GenerationConfig):
        return [config] * count
    configs = list(config)
    if len(configs) != count:
        raise ValueError(f"{len(configs)} generation configs for {count} requests")
    return configs


class Embedder(abc.ABC):
    """Texts + task type + dimension -> float32 vectors, L2-normalized, shape (len(texts), dimension)."""

    model_id: str
    model_version: str
    #: Full output dimension; smaller dimensions are Matryoshka truncations.
    native_dimension: int
    #: Precision of the model's weights ("float32", "int8", "int4", "mixed"), as evaluation reports state it; None where
    #: it is not known (an API model).
    weight_precision: str | None = None

    def __init__(self) -> None:
        self.stats = CallStats()

    @abc.abstractmethod
    def embed(self, texts: Sequence[str], task_type: TaskType, dimension: int | None = None) -> np.ndarray:
        """Embed `texts`; `dimension` defaults to `native_dimension`."""

    async def aembed(self, texts: Sequence[str], task_type: TaskType, dimension: int | None = None) -> np.ndarray:
        return await asyncio.to_thread(self.embed, texts, task_type, dimension)

    def async_loop(self) -> LoopThread | None:
        """As `LLM.async_loop`: where `aembed` runs for callers keeping many requests in flight, or None."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients or models."""


def truncate_and_normalize(vectors: np.ndarray, dimension: int) -> np.ndarray:
    """Matryoshka truncation: keep the first `dimension` components, then re-normalize to unit length."""
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {vectors.shape}")
    if not 0 < dimension <= vectors.shape[1]:
        raise ValueError(f"dimension {dimension} is outside 1..{vectors.shape[1]}")
    truncated = np.ascontiguousarray(vectors[:, :dimension], dtype=np.float32)
    norms = np.linalg.norm(truncated, axis=1, keepdims=True)
    # A zero vector stays zero instead of turning into NaN.
    return truncated / np.maximum(norms, 1e-12)
