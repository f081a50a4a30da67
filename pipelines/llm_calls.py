"""Every LLM call a stage makes goes through `CallLLM`: a request in, an answer out, the row context passed through.

Stages build `LLMRequest`s with pure functions, run them through `CallLLM`, and interpret the `LLMAnswer`s with pure
functions. Keeping the call in one transform is what lets the content-addressed cache, budgets and usage accounting
live in one place for every stage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import apache_beam as beam
from pydantic import BaseModel

from pipelines import progress
from pipelines.cache import LLM_CACHE, CacheWriter, SplitByCache
from pipelines.clients.base import LLM, ChatMessage, GenerationConfig, Usage
from pipelines.clients.factory import LLMSpec, build_llm, llm_identity


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
    #: Where the answer came from: "backend" (a paid call), "cache" (an earlier run), "duplicate" (an identical
    #: request of this run was called), "budget" (not called: the run's call budget was spent).
    source: Literal["backend", "cache", "duplicate", "budget"] = "backend"


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


def _cache_entry(key: str, answer: LLMAnswer, model_id: str, model_version: str) -> dict[str, Any]:
    return {
        "key": key,
        "model_id": model_id,
        "model_version": model_version,
        "prompt_name": answer.request.prompt_name,
        "prompt_version": answer.request.prompt_version,
        "response_json": json.dumps(answer.value, ensure_ascii=False, sort_keys=True),
        "raw_answer": answer.raw,
        "input_tokens": answer.usage.input_tokens,
        "output_tokens": answer.usage.output_tokens,
    }


def answers_from_cache(requests: list[LLMRequest], entry: dict[str, Any]) -> list[LLMAnswer]:
    value = json.loads(entry["response_json"])
    usage = Usage(entry["input_tokens"], entry["output_tokens"])
    return [LLMAnswer(request, True, value, entry["raw_answer"], None, usage, source="cache") for request in requests]


def answers_for_group(first: LLMAnswer, requests: list[LLMRequest]) -> list[LLMAnswer]:
    """One call serves every identical request of the run; only the first answer counts as a call."""
    rest = [replace(first, request=request, source="duplicate") for request in requests[1:]]
    return [first, *rest]


def _budget_refusal(requests: list[LLMRequest]) -> list[LLMAnswer]:
    reason = "skipped: the run's LLM call budget (max_llm_calls) is spent"
    return [LLMAnswer(request, False, None, "", reason, Usage(), source="budget") for request in requests]


class _CallMissesFn(beam.DoFn):
    """Calls the backend for a batch of cache misses, with the backend's own concurrency, and caches successes."""

    def __init__(self, spec: LLMSpec, stage: str, cache_dir: str | None):
        self._spec = spec
        self._stage = stage
        self._cache_dir = cache_dir
        self._llm: LLM | None = None
        self._writer: CacheWriter | None = None
        self._calls = beam.metrics.Metrics.counter(f"embforge.{stage}", "llm_calls")
        self._failures = beam.metrics.Metrics.counter(f"embforge.{stage}", "llm_failures")

    def setup(self) -> None:
        self._llm = build_llm(self._spec)
        self._model_id, self._model_version = llm_identity(self._spec)
        self._writer = CacheWriter(self._cache_dir, LLM_CACHE)

    def process(self, batch: list[tuple[str, list[LLMRequest]]], allowed_keys: frozenset[str] | None = None):
        assert self._llm is not None and self._writer is not None
        to_call = [(key, requests) for key, requests in batch if allowed_keys is None or key in allowed_keys]
        for key, requests in batch:
            if allowed_keys is not None and key not in allowed_keys:
                yield from _budget_refusal(requests)
        first_answers = call_many(self._llm, [requests[0] for _, requests in to_call], self._spec.concurrency)
        progress.advance(f"LLM calls: {self._stage}", len(to_call))
        for (key, requests), first in zip(to_call, first_answers, strict=True):
            self._calls.inc()
            if first.ok:
                self._writer.add(_cache_entry(key, first, self._model_id, self._model_version))
            else:
                self._failures.inc()
            yield from answers_for_group(first, requests)

    def finish_bundle(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        progress.flush()

    def teardown(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        if self._llm is not None:
            self._llm.close()


def call_many(llm: LLM, requests: list[LLMRequest], concurrency: int) -> list[LLMAnswer]:
    """Answers in request order; generate requests sharing an output model go out together with bounded concurrency."""
    answers: dict[int, LLMAnswer] = {}
    by_model: dict[tuple[type[BaseModel], GenerationConfig], list[int]] = {}
    for index, request in enumerate(requests):
        if request.mode == "generate" and request.output_model is not None:
            by_model.setdefault((request.output_model, request.config), []).append(index)
        else:
            answers[index] = call_llm(llm, request)
    for (output_model, config), indices in by_model.items():
        results = llm.generate_many([requests[i].messages for i in indices], output_model, config, concurrency)
        for index, result in zip(indices, results, strict=True):
            value = result.value.model_dump(mode="json") if result.ok and result.value is not None else None
            answers[index] = LLMAnswer(requests[index], result.ok, value, result.raw, result.error, result.usage)
    return [answers[index] for index in range(len(requests))]


class CallLLM(beam.PTransform):
    """PCollection[LLMRequest] -> PCollection[LLMAnswer]: exactly one answer per request, failures included.

    Requests are keyed by content address and joined with the LLM cache: hits are answered from the cache, identical
    requests share one call, and only the rest reach the backend. With `max_calls`, a deterministic subset of the
    misses (smallest keys) is called and the others are answered as skipped, so a budget is exact on any runner.
    """

    def __init__(self, spec: LLMSpec, stage: str, cache_dir: str | None = None, max_calls: int | None = None):
        super().__init__()
        self._spec = spec
        self._stage = stage
        self._cache_dir = cache_dir
        self._max_calls = max_calls
        self._identity = llm_identity(spec)

    def expand(self, requests):
        model_id, model_version = self._identity
        keyed = requests | "Key" >> beam.Map(lambda request: (request.cache_key(model_id, model_version), request))
        split = keyed | "Cache" >> SplitByCache(self._cache_dir, LLM_CACHE, f"ReadCache{self._stage}")
        hits = split["hits"] | "FromCache" >> beam.FlatMap(
            lambda hit: answers_from_cache(sorted(hit[0], key=lambda request: request.request_id), hit[1]))
        misses = split["misses"] | "SortGroups" >> beam.MapTuple(
            lambda key, group: (key, sorted(group, key=lambda request: request.request_id)))
        allowed = None
        if self._max_calls is not None:
            allowed = beam.pvalue.AsSingleton(
                misses
                | "MissKeys" >> beam.Keys()
                | "Allowed" >> beam.combiners.Top.Smallest(self._max_calls)
                | "AsSet" >> beam.Map(frozenset)
            )
        # Batches of the backend's concurrency keep that many requests in flight per worker.
        called = (
            misses
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=max(1, 2 * self._spec.concurrency))
            | "Call" >> beam.ParDo(_CallMissesFn(self._spec, self._stage, self._cache_dir), allowed)
        )
        return (hits, called) | "Answers" >> beam.Flatten()
