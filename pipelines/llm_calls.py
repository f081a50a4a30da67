"""Every LLM call a stage makes goes through `CallLLM`: a request in, an answer out, the row context passed through.

Stages build `LLMRequest`s with pure functions, run them through `CallLLM`, and interpret the `LLMAnswer`s with pure
functions. Keeping the call in one transform is what lets the content-addressed cache, budgets and usage accounting
live in one place for every stage.

A `RunBudget` caps the whole run's new calls and estimated cost. Beam has no global counter a worker could check before
each call, so the budget is planned instead: each stage's cache misses are sorted by cache key and the longest prefix
whose worst-case cost fits what is left is called; the rest are answered as skipped. What a stage actually spent
reaches the next stage that draws on the budget as a side input, so later stages plan with real figures, not
reservations. The result is exact and deterministic on any runner. The teacher's embeddings (EmbedTeacher) draw on the
same cost budget through the same `RunBudget.plan` / `RunBudget.record`; they are not LLM calls, so not on the count.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import apache_beam as beam
from pydantic import BaseModel

from pipelines import progress
from pipelines.cache import LLM_CACHE, CacheWriter, SplitByCache
from pipelines.clients.base import LLM, ChatMessage, GenerationConfig, Usage
from pipelines.clients.factory import billable_output_tokens, build_llm
from pipelines.clients.specs import LLMSpec
from pipelines.model_access import ModelAccess, ModelIdentity
from pipelines.pricing import estimated_cost_micro_usd


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


#: Rejection reason of a row whose LLM request the run's budget left uncalled: re-running without the budget (or with
#: a larger one) calls exactly these, since everything paid for before comes from the cache.
BUDGET_REASON = "skipped_by_budget"


def failure_reason(answer: LLMAnswer, reason: str) -> str:
    """The rejection reason for a failed answer: the stage's own `reason`, or BUDGET_REASON if it was never called."""
    return BUDGET_REASON if answer.source == "budget" else reason


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


#: Prose and code rarely pack more than one token into three bytes of UTF-8 (English averages about four characters a
#: token), so bytes / 3 over-estimates a prompt's tokens: the budget errs on the side of stopping early.
BYTES_PER_TOKEN_LOWER_BOUND = 3


def upper_token_estimate(texts) -> int:
    """At least as many tokens as `texts` hold: their UTF-8 bytes / 3, rounded up."""
    return -(-sum(len(text.encode()) for text in texts) // BYTES_PER_TOKEN_LOWER_BOUND)


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
    return estimated_cost_micro_usd(spec.model_name, Usage(asks * prompt_tokens, asks * output_tokens))


@dataclass(frozen=True)
class Spend:
    """New calls made and their estimated cost in micro-dollars (integers: sums are exact across workers)."""

    calls: int = 0
    micro_usd: int = 0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.calls + other.calls, self.micro_usd + other.micro_usd)


def add_spends(spends) -> Spend:
    return sum(spends, Spend())


def cheapest_prefix(candidates: list[tuple[str, int]], max_calls: int | None, max_micro_usd: int | None):
    """The smallest keys, in key order, while their count and summed worst-case cost stay within the limits."""
    prefix = []
    total = 0
    for key, cost in sorted(candidates):
        if max_calls is not None and len(prefix) >= max_calls:
            break
        if max_micro_usd is not None and total + cost > max_micro_usd:
            break
        prefix.append((key, cost))
        total += cost
    return prefix


class _PrefixWithinLimits(beam.CombineFn):
    """`cheapest_prefix` of every (key, worst-case cost) of a stage, holding only what could still be in it.

    A pair cut from a partial prefix is never in the whole one: more keys below it only raise the count and cost
    before it. So trimming as inputs arrive keeps memory bounded by the limits, not by the number of misses.
    """

    _TRIM_EVERY = 4096

    def __init__(self, max_calls: int | None, max_micro_usd: int | None):
        self._max_calls = max_calls
        self._max_micro_usd = max_micro_usd

    def _trim(self, candidates):
        return cheapest_prefix(candidates, self._max_calls, self._max_micro_usd)

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, candidate):
        accumulator.append(candidate)
        return self._trim(accumulator) if len(accumulator) % self._TRIM_EVERY == 0 else accumulator

    def merge_accumulators(self, accumulators):
        return self._trim([candidate for accumulator in accumulators for candidate in accumulator])

    def extract_output(self, accumulator):
        return self._trim(accumulator)


class RunBudget:
    """The run's limits, shared by the stages that spend (every `CallLLM`, and EmbedTeacher for cost) in the order the
    pipeline applies them.

    Built once per pipeline and handed to each of those stages; each one plans against what the stages applied before
    it have spent (`spent`, a one-element PCollection of `Spend`) and then adds its own. It lives only while the
    pipeline is constructed: workers receive plain numbers, never this object.
    """

    def __init__(self, max_calls: int | None = None, max_cost_usd: float | None = None):
        if max_calls is not None and max_calls < 0:
            raise ValueError(f"max_calls must be >= 0, got {max_calls}")
        if max_cost_usd is not None and max_cost_usd < 0:
            raise ValueError(f"max_cost_usd must be >= 0, got {max_cost_usd}")
        self.max_calls = max_calls
        self.max_micro_usd = None if max_cost_usd is None else round(max_cost_usd * 1_000_000)
        self.spent = None

    def describe(self) -> str:
        limits = []
        if self.max_calls is not None:
            limits.append(f"max_llm_calls={self.max_calls}")
        if self.max_micro_usd is not None:
            limits.append(f"max_cost_usd={self.max_micro_usd / 1_000_000:g}")
        return ", ".join(limits)

    def plan(self, candidates, *, counts_calls: bool = True):
        """PCollection of (key, worst-case micro-USD) -> one-element PCollection: the frozenset of keys that may be
        called, once the earlier stages' spending is known. Apply it inside the stage's `expand`.

        `counts_calls=False` plans against the cost limit only (teacher embeddings are not LLM calls).
        """
        max_calls = self.max_calls if counts_calls else None
        prefix = candidates | "PrefixWithinLimits" >> beam.CombineGlobally(
            _PrefixWithinLimits(max_calls, self.max_micro_usd))
        spent_before = beam.pvalue.AsSingleton(self.spent) if self.spent is not None else Spend()
        return prefix | "Allowed" >> beam.Map(keys_within_remaining, spent_before, max_calls, self.max_micro_usd)

    def record(self, spent_here) -> None:
        """Add a stage's spending (a one-element PCollection of `Spend`) to what the stages applied after it see."""
        spent = [spent_here] if self.spent is None else [self.spent, spent_here]
        self.spent = tuple(spent) | "RunSpend" >> beam.Flatten() | "SumSpend" >> beam.CombineGlobally(add_spends)


def keys_within_remaining(candidates, spent: Spend, max_calls: int | None, max_micro_usd: int | None) -> frozenset:
    """The keys of the stage's prefix that fit what the earlier stages left of the run's limits."""
    remaining_calls = None if max_calls is None else max(0, max_calls - spent.calls)
    remaining_micro_usd = None if max_micro_usd is None else max(0, max_micro_usd - spent.micro_usd)
    return frozenset(key for key, _ in cheapest_prefix(candidates, remaining_calls, remaining_micro_usd))


def _budget_refusal(requests: list[LLMRequest], limits: str) -> list[LLMAnswer]:
    reason = f"skipped: the run's LLM budget ({limits}) is spent"
    return [LLMAnswer(request, False, None, "", reason, Usage(), source="budget") for request in requests]


class _CallMissesFn(beam.DoFn):
    """Calls the backend for a batch of cache misses, with the backend's own concurrency, and caches successes."""

    def __init__(self, spec: LLMSpec, identity: ModelIdentity, stage: str, cache_dir: str | None,
                 budget_limits: str = ""):
        self._spec = spec
        self._model_id, self._model_version = identity
        self._stage = stage
        self._cache_dir = cache_dir
        self._budget_limits = budget_limits
        self._llm: LLM | None = None
        self._writer: CacheWriter | None = None
        self._calls = beam.metrics.Metrics.counter(f"embforge.{stage}", "llm_calls")
        self._failures = beam.metrics.Metrics.counter(f"embforge.{stage}", "llm_failures")

    def setup(self) -> None:
        self._llm = build_llm(self._spec)
        self._writer = CacheWriter(self._cache_dir, LLM_CACHE)

    def process(self, batch: list[tuple[str, list[LLMRequest]]], allowed_keys: frozenset[str] | None = None):
        assert self._llm is not None and self._writer is not None
        to_call = [(key, requests) for key, requests in batch if allowed_keys is None or key in allowed_keys]
        for key, requests in batch:
            if allowed_keys is not None and key not in allowed_keys:
                yield from _budget_refusal(requests, self._budget_limits)
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
            value = result.value.model_dump(mode="json") if result.ok and result.value is not None else None
            answers[index] = LLMAnswer(requests[index], result.ok, value, result.raw, result.error, result.usage)
    return [answers[index] for index in range(len(requests))]


class CallLLM(beam.PTransform):
    """PCollection[LLMRequest] -> PCollection[LLMAnswer]: exactly one answer per request, failures included.

    Requests are keyed by content address and joined with the LLM cache: hits are answered from the cache, identical
    requests share one call, and only the rest reach the backend. With a `RunBudget`, the misses called are the
    smallest keys that fit what the run has left (see the module docstring); the others are answered as skipped.
    """

    def __init__(self, access: ModelAccess, stage: str):
        super().__init__()
        self._spec = access.spec
        self._stage = stage
        self._cache_dir = access.cache_dir
        self._budget = access.budget
        self._identity = access.identity

    def expand(self, requests):
        model_id, model_version = self._identity
        keyed = requests | "Key" >> beam.Map(lambda request: (request.cache_key(model_id, model_version), request))
        split = keyed | "Cache" >> SplitByCache(self._cache_dir, LLM_CACHE, f"ReadCache{self._stage}")
        hits = split["hits"] | "FromCache" >> beam.FlatMap(
            lambda hit: answers_from_cache(sorted(hit[0], key=lambda request: request.request_id), hit[1]))
        misses = split["misses"] | "SortGroups" >> beam.MapTuple(
            lambda key, group: (key, sorted(group, key=lambda request: request.request_id)))
        allowed = None if self._budget is None else beam.pvalue.AsSingleton(self._plan(misses))
        # The backend keeps `concurrency` requests in flight within a batch, and each batch ends in a barrier (its
        # slowest request). Batches of 8x concurrency from the start (not BatchElements' ramp from 1) keep the barriers
        # rare: measured against a 200 ms fake server at concurrency 8, achieved/ideal calls/s went from 0.57 to ~0.75
        # (benchmarks/llm_concurrency.py). The price: a kill loses at most one batch of paid answers, cached at its end.
        batch_size = max(1, 8 * self._spec.concurrency)
        called = (
            misses
            | "Batch" >> beam.BatchElements(min_batch_size=batch_size, max_batch_size=batch_size)
            | "Call" >> beam.ParDo(
                _CallMissesFn(self._spec, self._identity, self._stage, self._cache_dir,
                              self._budget.describe() if self._budget else ""), allowed)
        )
        if self._budget is not None:
            self._record_spend(called)
        return (hits, called) | "Answers" >> beam.Flatten()

    def _plan(self, misses):
        """The set of miss keys this stage may call, once the earlier stages' spending is known."""
        spec = self._spec
        # Every ask a call may make is reserved (see billed_asks), so re-asks cannot carry the spend past the cap.
        candidates = misses | "WorstCase" >> beam.MapTuple(
            lambda key, group: (key, worst_case_micro_usd(spec, group[0])))
        return self._budget.plan(candidates)

    def _record_spend(self, called) -> None:
        model = self._spec.model_name
        spent_here = (
            called
            | "Paid" >> beam.Filter(lambda answer: answer.source == "backend")
            | "Price" >> beam.Map(lambda answer: Spend(1, estimated_cost_micro_usd(model, answer.usage)))
            | "StageSpend" >> beam.CombineGlobally(add_spends)
        )
        self._budget.record(spent_here)
