"""In-process fakes implementing the `LLM` and `Embedder` interfaces, with answers known in advance.

The Gemini path is tested through the real google-genai SDK against `tests/fakes/gemini_server.py`; these fakes serve
stage-level tests that need a backend whose right answers are known.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ValidationError

from pipelines.clients.base import (
    LLM,
    ChatMessage,
    Embedder,
    GenerationConfig,
    GenerationResult,
    TaskType,
    Usage,
    truncate_and_normalize,
)

_WORD = re.compile(r"[a-z0-9]+")


class KeywordEmbedder(Embedder):
    """Bag-of-keywords vectors: each vocabulary word owns one axis, so cosine similarity is keyword overlap.

    Words outside the vocabulary hash into the remaining axes, so unrelated texts are near-orthogonal but never zero.
    """

    model_id = "keyword-embedder"
    model_version = "1"

    def __init__(self, vocabulary: Sequence[str] = (), dimension: int = 64):
        super().__init__()
        if len(vocabulary) >= dimension:
            raise ValueError(f"vocabulary of {len(vocabulary)} words needs dimension > {len(vocabulary)}")
        self.native_dimension = dimension
        self._axis = {word: index for index, word in enumerate(vocabulary)}
        self._hashed_axes = dimension - len(vocabulary)

    def _vector(self, text: str) -> np.ndarray:
        vector = np.zeros(self.native_dimension, dtype=np.float32)
        for word in _WORD.findall(text.lower()):
            if word in self._axis:
                vector[self._axis[word]] += 1.0
            else:
                digest = int(hashlib.sha256(word.encode()).hexdigest(), 16)
                vector[len(self._axis) + digest % self._hashed_axes] += 0.1
        return vector

    def embed(self, texts: Sequence[str], task_type: TaskType, dimension: int | None = None) -> np.ndarray:
        self.stats.record()
        vectors = np.stack([self._vector(text) for text in texts]) if texts else np.zeros((0, self.native_dimension))
        return truncate_and_normalize(vectors.astype(np.float32), dimension or self.native_dimension)


class ScriptedLLM(LLM):
    """Answers with `respond(messages, output_model)` -> raw JSON text, parsed like a real backend would.

    `logprobs(messages, continuation)` enables `score`. Unparseable or schema-violating answers come back as failed
    results that keep the raw text, exactly as the real clients report them.
    """

    model_id = "scripted-llm"
    model_version = "1"

    def __init__(
        self,
        respond: Callable[[Sequence[ChatMessage], type[BaseModel]], str],
        logprobs: Callable[[Sequence[ChatMessage], str], float] | None = None,
    ):
        super().__init__()
        self._respond = respond
        self._logprobs = logprobs
        self.supports_logprobs = logprobs is not None

    def generate(self, messages, output_model, config: GenerationConfig = GenerationConfig()) -> GenerationResult:
        raw = self.answer(messages, output_model, config)
        usage = Usage(sum(len(m.content.split()) for m in messages), len(raw.split()))
        try:
            value = output_model.model_validate(json.loads(raw))
        except (json.JSONDecodeError, ValidationError) as error:
            self.stats.record(usage=usage, failed=True)
            return GenerationResult(ok=False, value=None, raw=raw, error=f"invalid answer: {error}", usage=usage)
        self.stats.record(usage=usage)
        return GenerationResult(ok=True, value=value, raw=raw, usage=usage)

    def answer(self, messages, output_model, config: GenerationConfig) -> str:
        """The raw answer; a fake whose answers depend on sampling (temperature, seed) overrides this."""
        return self._respond(messages, output_model)

    def score(self, messages: Sequence[ChatMessage], continuations: Sequence[str]) -> list[float]:
        if self._logprobs is None:
            return super().score(messages, continuations)
        self.stats.record()
        return [self._logprobs(messages, continuation) for continuation in continuations]


def keyword_embedder() -> KeywordEmbedder:
    """Factory for `EmbedderSpec(backend="custom", model="tests.fakes.backends:keyword_embedder")`."""
    return KeywordEmbedder(vocabulary=("json", "csv", "path", "date", "regex", "heap", "sort", "zip"), dimension=32)
