"""The run's budget: a cap on the new LLM calls and estimated cost of a whole run, shared by every model-calling stage.

A `RunBudget` caps the whole run's new calls and estimated cost. Beam has no global counter a worker could check before
each call, so the budget is planned instead: each stage's cache misses are sorted by cache key and the longest prefix
whose worst-case cost fits what is left is called; the rest are answered as skipped. What a stage actually spent
reaches the next stage that draws on the budget as a side input, so later stages plan with real figures, not
reservations. The result is exact and deterministic on any runner. The teacher's embeddings (EmbedTeacher) draw on the
same cost budget through the same `RunBudget.plan` / `RunBudget.record`; they are not LLM calls, so not on the count.
Both plan and record through `CachedCall` (pipelines/cached_calls.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam

#: Rejection reason of a row whose LLM request the run's budget left uncalled: re-running without the budget (or with
#: a larger one) calls exactly these, since everything paid for before comes from the cache.
BUDGET_REASON = "skipped_by_budget"


#: Prose and code rarely pack more than one token into three bytes of UTF-8 (English averages about four characters a
#: token), so bytes / 3 over-estimates a prompt's tokens: the budget errs on the side of stopping early.
BYTES_PER_TOKEN_LOWER_BOUND = 3


def upper_token_estimate(texts) -> int:
    """At least as many tokens as `texts` hold: their UTF-8 bytes / 3, rounded up."""
    return -(-sum(len(text.encode()) for text in texts) // BYTES_PER_TOKEN_LOWER_BOUND)


@dataclass(frozen=True)
class Spend:
    """New calls made and their estimated cost in micro-dollars (integers: sums are exact across workers)."""

    calls: int = 0
    micro_usd: int = 0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.calls + other.calls, self.micro_usd + other.micro_usd)


def add_spends(spends) -> Spend:
    return sum(spends, Spend())


def split_by_plan(batch, allowed_keys: frozenset[str] | None) -> tuple[list, list]:
    """A batch of (key, items) misses -> (the items lists the plan leaves uncalled, the (key, items) it allows to
    call); without a plan (None) every key is allowed."""
    refused, allowed = [], []
    for key, items in batch:
        if allowed_keys is not None and key not in allowed_keys:
            refused.append(items)
        else:
            allowed.append((key, items))
    return refused, allowed


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
