"""Every LLM call a stage makes goes through `CallLLM`: a request in, an answer out, the row context passed through.

Stages build `LLMRequest`s with pure functions, run them through `CallLLM`, and interpret the `LLMAnswer`s with pure
functions. Keeping the call in one transform is what lets the content-addressed cache, budgets and usage accounting
live in one place for every stage: `CallLLM` is the cached-call transform (pipelines/cached_calls.py) with the LLM's
handler, `LLMCallHandler`. The run's budget (pipelines/budget.py) is planned per stage: a stage calls the smallest
cache-miss keys that fit what the stages before it left, and its spend reaches the stages after it as a side input.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import apache_beam as beam
from pydantic import BaseModel

from pipelines import progress
from pipelines.budget import BUDGET_REASON, Spend, upper_token_estimate
from pipelines.cache import LLM_CACHE, CacheWriter, llm_partition
from pipelines.cached_calls import CachedCall, CallHandler
from pipelines.clients.base import LLM, ChatMessage, GenerationConfig, GenerationResult, Usage
from pipelines.clients.factory import billable_output_tokens, build_batch_client, build_llm
from pipelines.clients.gemini_thinking import gemini_thinking_budget
from pipelines.clients.specs import LLMSpec
from pipelines.model_access import ModelAccess, ModelIdentity
from pipelines.pricing import estimated_cost_micro_usd

#: Backends whose calls wait on the network: their requests are kept in flight (pipelines/cached_calls.py).
IN_FLIGHT_BACKENDS = ("gemini", "openai")


@functools.cache
def _json_schema(output_model: type[BaseModel]) -> dict[str, Any]:
    """Pydantic rebuilds the schema on every call (~0.2 ms): noticeable at one cache key per request."""
    return output_model.model_json_schema()


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
            "schema": _json_schema(self.output_model) if self.output_model else None,
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
    #: The part of `usage` billed through the Batch API (at its price); the rest was billed online.
    batch_usage: Usage = Usage()


def answer_cost_micro_usd(spec: LLMSpec, answer: LLMAnswer) -> int:
    """What a paid answer cost: its batch part at the Batch API's price, the rest (online asks) at list price."""
    online = Usage(answer.usage.input_tokens - answer.batch_usage.input_tokens,
                   answer.usage.output_tokens - answer.batch_usage.output_tokens)
    return (estimated_cost_micro_usd(spec, answer.batch_usage, mode="batch")
            + estimated_cost_micro_usd(spec, online, mode="online"))


def failure_reason(answer: LLMAnswer, reason: str) -> str:
    """The rejection reason for a failed answer: the stage's own `reason`, or BUDGET_REASON if it was never called."""
    return BUDGET_REASON if answer.source == "budget" else reason


def answer_of(request: LLMRequest, result: GenerationResult) -> LLMAnswer:
    """A backend's generation result as the request's answer."""
    value = result.value.model_dump(mode="json") if result.ok and result.value is not None else None
    return LLMAnswer(request, result.ok, value, result.raw, result.error, result.usage)


def call_llm(llm: LLM, request: LLMRequest) -> LLMAnswer:
    """One request against one backend; a bad answer is a failed `LLMAnswer`, never an exception."""
    if request.mode == "score":
        logprobs = llm.score(request.messages, request.continuations)
        return LLMAnswer(request, True, {"logprobs": list(logprobs)}, json.dumps(logprobs), None, Usage())
    if request.output_model is None:
        raise ValueError(f"request {request.request_id}: generate mode needs an output_model")
    return answer_of(request, llm.generate(request.messages, request.output_model, request.config))


async def acall_llm(llm: LLM, request: LLMRequest) -> LLMAnswer:
    """`call_llm`, awaited on the backend's event loop (score mode, which API backends lack, in a thread)."""
    if request.mode == "generate" and request.output_model is not None:
        return answer_of(request, await llm.agenerate(request.messages, request.output_model, request.config))
    return await asyncio.to_thread(call_llm, llm, request)


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



def billed_asks(spec: LLMSpec, request: LLMRequest) -> int:
    """How many asks one call may be billed for.

    A generate answer that does not parse or violates the output schema is asked again, up to max_parse_attempts
    asks, and every ask that was answered is billed (GeminiLLM sums their usage). Transient failures retried within
    an ask (429, 5xx) need no reservation: Google bills only requests it answered. Score mode never asks again.
    """
    return spec.max_parse_attempts if request.mode == "generate" else 1


def worst_case_micro_usd(spec: LLMSpec, request: LLMRequest) -> int:
    """An upper estimate of what one call may be billed: every ask it may make (`billed_asks`), each with the prompt
    at bytes / 3 tokens and the answer at the most output tokens one request may be billed for (`max_output_tokens`,
    plus the thinking budget on Gemini, which bills thinking as output: `billable_output_tokens`).
    """
    asks = billed_asks(spec, request)
    prompt_tokens = upper_token_estimate([message.content for message in request.messages]
                                         + list(request.continuations))
    output_tokens = billable_output_tokens(spec, request.config.max_output_tokens) if request.mode == "generate" else 0
    online = estimated_cost_micro_usd(spec, Usage(asks * prompt_tokens, asks * output_tokens), mode="online")
    if spec.mode != "batch":
        return online
    # The batch ask, then, if its line fails or does not validate, every ask online at list price.
    return online + estimated_cost_micro_usd(spec, Usage(prompt_tokens, output_tokens), mode="batch")



def answer_tallies(answer: LLMAnswer, stage: str, spec: LLMSpec) -> Iterator[tuple[tuple[str, ...], int]]:
    """The manifest tallies of one answer: a paid call (its tokens and estimated cost), a cache hit, or a request the
    budget left uncalled. An answer shared from an identical request of the run counts nothing."""
    yield ("llm", stage, "calls"), int(answer.source == "backend")
    yield ("llm", stage, "cache_hits"), int(answer.source == "cache")
    yield ("llm", stage, "skipped_by_budget"), int(answer.source == "budget")
    if answer.source == "backend":
        yield ("llm", stage, "input_tokens"), answer.usage.input_tokens
        yield ("llm", stage, "output_tokens"), answer.usage.output_tokens
        yield ("cost", stage), answer_cost_micro_usd(spec, answer)
        yield ("cache", "llm_calls"), 1
    elif answer.source == "cache":
        yield ("cache", "llm_hits"), 1



def _budget_refusal(requests: list[LLMRequest], limits: str) -> list[LLMAnswer]:
    reason = f"skipped: the run's LLM budget ({limits}) is spent"
    return [LLMAnswer(request, False, None, "", reason, Usage(), source="budget") for request in requests]



def call_many(llm: LLM, requests: list[LLMRequest], concurrency: int) -> list[LLMAnswer]:
    """Answers in request order; generate requests sharing an output model go out together with bounded concurrency."""
    answers: dict[int, LLMAnswer] = {}
    # One group per output model, each request with its own config: sampled candidates differ only in their seeds,
    # and a backend that answers several at once (LocalLLM's batches) should get them together.
    by_model: dict[type[BaseModel], list[int]] = {}
    for index, request in enumerate(requests):
        if request.mode == "generate" and request.output_model is not None:
            by_model.setdefault(request.output_model, []).append(index)
        else:
            answers[index] = call_llm(llm, request)
    for output_model, indices in by_model.items():
        results = llm.generate_many([requests[i].messages for i in indices], output_model,
                                    [requests[i].config for i in indices], concurrency)
        for index, result in zip(indices, results, strict=True):
            answers[index] = answer_of(requests[index], result)
    return [answers[index] for index in range(len(requests))]


class LLMCallHandler(CallHandler):
    """The LLM behind `CachedCall`: requests keyed by content address, identical requests answered by one call (the
    first by request_id), every answer counted into the stage's usage tallies (`answer_tallies`)."""

    cache_kind = LLM_CACHE
    #: Small flushes cost a few more cache files but bound what a kill can lose to 16 paid answers.
    flush_every = 16

    def __init__(self, spec: LLMSpec, identity: ModelIdentity, stage: str):
        if spec.backend in IN_FLIGHT_BACKENDS:
            # One request per key, `concurrency` of them always in flight (cached_calls.py): no batch barriers.
            super().__init__(stage, identity, batch_size=1)
            self.in_flight = spec.concurrency
        else:
            # The local backend decodes `concurrency` answers per forward pass (generate_many); batches of 8x that
            # give it full decoding batches, and a kill loses at most one batch of answers, cached at its end.
            super().__init__(stage, identity, batch_size=max(1, 8 * spec.concurrency))
        self.spec = spec
        self.batch_mode = spec.mode == "batch"
        self.batch_max_requests = spec.batch.max_requests
        self._calls = beam.metrics.Metrics.counter(f"embforge.{stage}", "llm_calls")
        self._failures = beam.metrics.Metrics.counter(f"embforge.{stage}", "llm_failures")

    def _counted(self, answers: Iterable[LLMAnswer]) -> Iterator[LLMAnswer]:
        for answer in answers:
            for key, count in answer_tallies(answer, self.stage, self.spec):
                self.tally.add(key, count)
            yield answer

    def key(self, request: LLMRequest) -> str:
        return request.cache_key(*self.identity)

    def partition(self, request: LLMRequest) -> str:
        return llm_partition(*self.identity, request.prompt_name, request.prompt_version)

    def group(self, requests: list[LLMRequest]) -> list[LLMRequest]:
        return sorted(requests, key=lambda request: request.request_id)

    def from_cache(self, requests: list[LLMRequest], entry: dict[str, Any]) -> Iterator[LLMAnswer]:
        return self._counted(answers_from_cache(requests, entry))

    def worst_case_micro_usd(self, requests: list[LLMRequest]) -> int:
        # Every ask a call may make is reserved (see billed_asks), so re-asks cannot carry the spend past the cap.
        return worst_case_micro_usd(self.spec, requests[0])

    def refuse(self, requests: list[LLMRequest], budget_limits: str) -> Iterator[LLMAnswer]:
        return self._counted(_budget_refusal(requests, budget_limits))

    def load_client(self) -> LLM:
        return build_llm(self.spec)

    def call(self, llm: LLM, batch: list[tuple[str, list[LLMRequest]]], cache: CacheWriter) -> Iterator[LLMAnswer]:
        """One call per key, with the backend's own concurrency; successes are cached."""
        first_answers = call_many(llm, [requests[0] for _, requests in batch], self.spec.concurrency)
        for (key, requests), first in zip(batch, first_answers, strict=True):
            yield from self._answered(key, requests, first, cache)

    async def acall(self, llm: LLM, batch: list[tuple[str, list[LLMRequest]]]) -> list[LLMAnswer]:
        return [await acall_llm(llm, requests[0]) for _, requests in batch]

    def collect(self, batch: list[tuple[str, list[LLMRequest]]], answer: concurrent.futures.Future,
                cache: CacheWriter) -> Iterator[LLMAnswer]:
        for (key, requests), first in zip(batch, answer.result(), strict=True):
            yield from self._answered(key, requests, first, cache)

    def load_batch_client(self) -> Any:
        return build_batch_client(self.spec)

    def batch_line(self, key: str, requests: list[LLMRequest]) -> dict[str, Any]:
        # Batch mode is Gemini's: its SDK is imported only here, so a local run never loads it.
        from pipelines.clients.gemini_batch import generate_request_line

        request = requests[0]
        if request.mode != "generate" or request.output_model is None:
            raise ValueError(f"request {request.request_id}: batch mode asks for generate requests only")
        spec = self.spec
        return generate_request_line(key, request.messages, request.output_model, request.config, spec.model_name,
                                     gemini_thinking_budget(spec.model_name, spec.thinking_budget))

    def answer_batch(self, llm: LLM, answered: list[tuple[str, list[LLMRequest], dict[str, Any] | None]],
                     cache: CacheWriter) -> tuple[list[LLMAnswer], int]:
        from pipelines.clients.gemini import parse_generate_response
        from pipelines.clients.gemini_batch import line_error, response_of

        outputs: list[LLMAnswer] = []
        online: list[tuple[str, list[LLMRequest], Usage]] = []
        for key, requests, line in answered:
            first = requests[0]
            if line_error(line) is None:
                parsed = parse_generate_response(response_of(line), first.output_model)
                if parsed.value is not None:
                    answer = LLMAnswer(first, True, parsed.value.model_dump(mode="json"), parsed.raw, None,
                                       parsed.usage, batch_usage=parsed.usage)
                    outputs += self._answered(key, requests, answer, cache)
                    continue
                online.append((key, requests, parsed.usage))  # billed, but no answer: asked again online
            else:
                online.append((key, requests, Usage()))
        if online:
            answers = call_many(llm, [requests[0] for _, requests, _ in online], self.spec.concurrency)
            for (key, requests, batch_usage), answer in zip(online, answers, strict=True):
                answer = replace(answer, usage=answer.usage + batch_usage, batch_usage=batch_usage)
                outputs += self._answered(key, requests, answer, cache)
        return outputs, len(online)

    def _answered(self, key: str, requests: list[LLMRequest], first: LLMAnswer,
                  cache: CacheWriter) -> Iterator[LLMAnswer]:
        """The answers of one key's call: cached if it succeeded, shared with the key's identical requests."""
        progress.advance(f"LLM calls: {self.stage}")
        self._calls.inc()
        if first.ok:
            cache.add(_cache_entry(key, first, *self.identity))
        else:
            self._failures.inc()
        yield from self._counted(answers_for_group(first, requests))

    def spend(self, answer: LLMAnswer) -> Spend | None:
        if answer.source != "backend":
            return None
        return Spend(1, answer_cost_micro_usd(self.spec, answer))


class CallLLM(beam.PTransform):
    """PCollection[LLMRequest] -> {"answers": LLMAnswer, exactly one per request, failures included; "tallies": the
    stage's LLM usage (`answer_tallies`), summed}.

    Requests are keyed by content address and joined with the LLM cache: hits are answered from the cache, identical
    requests share one call, and only the rest reach the backend. With a budget, the misses called are the smallest
    keys that fit what the run has left (pipelines/budget.py); the others are answered as skipped.
    """

    def __init__(self, access: ModelAccess, stage: str):
        super().__init__()
        self._access = access
        self._stage = stage

    def expand(self, requests):
        access = self._access
        handler = LLMCallHandler(access.spec, access.identity, self._stage)
        called = requests | "Call" >> CachedCall(handler, access.cache_dir, access.budget)
        return {"answers": called["main"], "tallies": called["tallies"]}
