"""Every LLM call a stage makes goes through `CallLLM`: a request in, an answer out, the row context passed through.

Stages build `LLMRequest`s with pure functions, run them through `CallLLM`, and interpret the `LLMAnswer`s with pure
functions. Keeping the call in one transform is what lets the content-addressed cache, budgets and usage accounting
live in one place for every stage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import apache_beam as beam
from pydantic import BaseModel

from pipelines.clients.base import LLM, ChatMessage, GenerationConfig, Usage
from pipelines.clients.factory import LLMSpec, build_llm


@dataclass(frozen=True)
class LLMRequest:
    #: Unique within the stage, e.g. "<pair_id>/grade".
    request_id: str
    prompt_name: str
    prompt_version: str
    messages: tuple[ChatMessage, ...]
    output_model: type[BaseModel] | None = None
    config: GenerationConfig = GenerationConfig()
    #: "generate": structured answer as `output_model`; "score": log-probabilities of `continuations`.
    mode: Literal["generate", "score"] = "generate"
    continuations: tuple[str, ...] = ()
    #: Whatever the stage needs back with the answer (the row being processed). Not part of the cache key.
    context: Any = field(default=None, compare=False)

    def cache_key(self, llm_model_id: str, llm_model_version: str) -> str:
        """Content address: model + version, prompt + version, rendered messages, output schema, config, mode."""
        material = {
            "model": llm_model_id,
            "model_version": llm_model_version,
            "prompt": self.prompt_name,
            "prompt_version": self.prompt_version,
            "messages": [[message.role, message.content] for message in self.messages],
            "schema": self.output_model.model_json_schema() if self.output_model else None,
            "config": [self.config.temperature, self.config.max_output_tokens, self.config.seed],
            "mode": self.mode,
            "continuations": list(self.continuations),
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class LLMAnswer:
    request: LLMRequest
    ok: bool
    #: Generate mode: the validated answer as a dict. Score mode: {"logprobs": [...]}.
    value: dict[str, Any] | None
    raw: str
    error: str | None
    usage: Usage
    cached: bool = False


def call_llm(llm: LLM, request: LLMRequest) -> LLMAnswer:
    """One request against one backend; a bad answer is a failed `LLMAnswer`, never an exception."""
    if request.mode == "score":
        logprobs = llm.score(request.messages, request.continuations)
        return LLMAnswer(request, True, {"logprobs": list(logprobs)}, json.dumps(logprobs), None, Usage())
    if request.output_model is None:
        raise ValueError(f"request {request.request_id}: generate mode needs an output_model")
    result = llm.generate(request.messages, request.output_model, request.config)
    value = result.value.model_dump(mode="json") if result.ok and result.value is not None else None
    return LLMAnswer(request, result.ok, value, result.raw, result.error, result.usage)


class _CallLLMFn(beam.DoFn):
    def __init__(self, spec: LLMSpec, stage: str):
        self._spec = spec
        self._stage = stage
        self._llm: LLM | None = None
        self._calls = beam.metrics.Metrics.counter(f"embforge.{stage}", "llm_calls")
        self._failures = beam.metrics.Metrics.counter(f"embforge.{stage}", "llm_failures")

    def setup(self) -> None:
        self._llm = build_llm(self._spec)

    def process(self, request: LLMRequest) -> Iterator[LLMAnswer]:
        assert self._llm is not None
        answer = call_llm(self._llm, request)
        self._calls.inc()
        if not answer.ok:
            self._failures.inc()
        yield answer

    def teardown(self) -> None:
        if self._llm is not None:
            self._llm.close()


class CallLLM(beam.PTransform):
    """PCollection[LLMRequest] -> PCollection[LLMAnswer] (one answer per request, failures included)."""

    def __init__(self, spec: LLMSpec, stage: str):
        super().__init__()
        self._spec = spec
        self._stage = stage

    def expand(self, requests):
        return requests | "Call" >> beam.ParDo(_CallLLMFn(self._spec, self._stage))
