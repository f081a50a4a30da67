"""One cached-call transform for every model a stage calls, in the shape of Beam's RunInference.

A `CallHandler` says how one kind of backend is called (the LLM: pipelines/llm_calls.py; the teacher embedder:
pipelines/stages/embed_teacher.py): how an item is keyed, answered from a cache entry, priced for the budget, refused,
and how a batch of misses is sent. `CachedCall` owns everything else, once for both: key -> join with the
content-addressed cache -> hits answered from it, misses grouped by key (identical items share one call) -> the budget's
plan (pipelines/budget.py: `RunBudget`) -> fixed-size batches -> one DoFn lifecycle: `setup` builds the client,
`process` calls a batch of misses and adds their cache entries (written every `flush_every`: what a kill can lose),
`finish_bundle` flushes the cache writer and the bundle's tallies, `teardown` flushes and closes the client.

Three ways to send the misses:
- **batch by batch** (`CallHandler.call`): a backend that answers a batch at once itself (the local LLM decodes a batch
  per forward pass, the local teacher embeds one) gets fixed-size batches;
- **always in flight** (`CallHandler.acall`, when `in_flight` > 0): an API backend, whose calls wait on the network,
  keeps `in_flight` requests running on its event loop at all times. Each answer is collected as it arrives and a
  new request starts in its slot, so no slot waits for the slowest request of a batch. The one wait left is at the
  end of a bundle: Beam commits a bundle only with all its outputs, so `finish_bundle` collects what is still in
  flight;
- **as Batch API jobs** (`CallHandler.answer_batch`, when `batch_mode`): pipelines/batch_calls.py.

Handlers are plain picklable objects: they travel to the workers inside the DoFns; the client is built there.
"""

from __future__ import annotations

import abc
import concurrent.futures
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from pipelines import progress
from pipelines.accounting import TALLIES, StageTally, sum_tallies
from pipelines.batch_calls import BatchJobs
from pipelines.budget import RunBudget, add_spends, split_by_plan
from pipelines.cache import CacheWriter, SplitByCache
from pipelines.model_access import ModelIdentity


class CallHandler(abc.ABC):
    """How one kind of backend is called through the cache. Subclasses set the class attributes and implement the
    methods; `tally` counts the calls' usage into the stage's manifest tallies and Beam counters, from whichever DoFn
    runs the handler.
    """

    #: Cache folder kind (pipelines/cache.py).
    cache_kind: str
    #: Cache entries buffered before a flush: what a kill can lose.
    flush_every: int
    #: Tagged outputs the call emits besides its main output (TALLIES is always there).
    outputs: tuple[str, ...] = ()
    #: Where the calls' spend for the budget is read: None for the main output, else one of `outputs`.
    spend_output: str | None = None
    #: Whether the run's call limit applies (LLM calls) or only its cost limit (embeddings).
    counts_calls: bool = True
    #: Requests kept in flight by `acall` (an API backend); 0 sends the misses batch by batch through `call`.
    in_flight: int = 0
    #: Seconds a cache entry may wait in the writer's buffer: what a kill can lose while answers come slowly.
    flush_seconds: float = 5.0
    #: Whether misses go to Gemini Batch API jobs (the spec's mode "batch", pipelines/batch_calls.py), at most
    #: `batch_max_requests` a job, as embedding jobs when `batch_embeddings`.
    batch_mode: bool = False
    batch_max_requests: int = 20_000
    batch_embeddings: bool = False

    def __init__(self, stage: str, identity: ModelIdentity, batch_size: int):
        self.stage = stage
        self.identity = identity
        self.batch_size = batch_size
        # Each DoFn holding the handler gets its own pickled copy, so the cache hits and the calls tally apart, each
        # flushing its own bundle's counts; CachedCall sums the two outputs.
        self.tally = StageTally(stage)

    @abc.abstractmethod
    def key(self, item: Any) -> str:
        """The item's content address: equal keys share one call and one cache entry."""

    @abc.abstractmethod
    def partition(self, item: Any) -> str:
        """The cache partition the item's key can be found in (pipelines/cache.py), from the same fields as its key."""

    def group(self, items: list[Any]) -> list[Any]:
        """The items of one key in the order they are answered (the first one is the one called)."""
        return items

    @abc.abstractmethod
    def from_cache(self, items: list[Any], entry: dict[str, Any]) -> Iterable[Any]:
        """Outputs of items answered by a cache entry."""

    @abc.abstractmethod
    def worst_case_micro_usd(self, items: list[Any]) -> int:
        """At least what calling one key may cost, for the budget's plan."""

    @abc.abstractmethod
    def refuse(self, items: list[Any], budget_limits: str) -> Iterable[Any]:
        """Outputs of items the budget leaves uncalled."""

    @abc.abstractmethod
    def load_client(self) -> Any:
        """The backend client (in `setup`, on the worker)."""

    @abc.abstractmethod
    def call(self, client: Any, batch: list[tuple[str, list[Any]]], cache: CacheWriter) -> Iterable[Any]:
        """Outputs of a batch of (key, items) misses; adds each success's cache entry to `cache` (failures never)."""

    async def acall(self, client: Any, batch: list[tuple[str, list[Any]]]) -> Any:
        """The backend's answer to a batch of misses, awaited on the client's event loop (`in_flight` > 0 only); an
        exception it raises reaches `collect` through the future."""
        raise NotImplementedError(f"{type(self).__name__} sends its misses batch by batch")

    def collect(self, batch: list[tuple[str, list[Any]]], answer: concurrent.futures.Future,
                cache: CacheWriter) -> Iterable[Any]:
        """Outputs of a batch `acall` has answered (`answer.result()`), as `call` gives them; adds each success's cache
        entry to `cache`."""
        raise NotImplementedError(f"{type(self).__name__} sends its misses batch by batch")

    def load_batch_client(self) -> Any:
        """The Batch API client (`batch_mode` only; in `setup`, on the worker)."""
        raise NotImplementedError(f"{type(self).__name__} has no batch mode")

    def batch_line(self, key: str, items: list[Any]) -> dict[str, Any]:
        """The JSONL input line of one miss in a Batch API job."""
        raise NotImplementedError(f"{type(self).__name__} has no batch mode")

    def answer_batch(self, client: Any, answered: list[tuple[str, list[Any], dict[str, Any] | None]],
                     cache: CacheWriter) -> tuple[list[Any], int]:
        """The outputs of a job's misses from their result lines (None: no line), and how many were asked online
        instead (lines that failed or did not validate), through `client`; adds each success's cache entry."""
        raise NotImplementedError(f"{type(self).__name__} has no batch mode")

    @abc.abstractmethod
    def spend(self, output: Any) -> Any:
        """The `Spend` of one element of the `spend_output` output, or None when it spent nothing."""

    def close_client(self, client: Any) -> None:
        client.close()


class _KeyFn(beam.DoFn):
    def __init__(self, handler: CallHandler):
        self._handler = handler

    def process(self, item: Any) -> Iterator[tuple[str, Any]]:
        yield self._handler.key(item), item


class _FromCacheFn(beam.DoFn):
    def __init__(self, handler: CallHandler):
        self._handler = handler

    def process(self, hit: tuple[list[Any], dict[str, Any]]) -> Iterator[Any]:
        items, entry = hit
        yield from self._handler.from_cache(self._handler.group(items), entry)

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._handler.tally.flush()


class _CallMissesFn(beam.DoFn):
    """The one lifecycle of a model call: a client per worker, a batch of misses per call, cache writes per bundle."""

    def __init__(self, handler: CallHandler, cache_dir: str | None, budget_limits: str = ""):
        self._handler = handler
        self._cache_dir = cache_dir
        self._budget_limits = budget_limits
        self._client: Any = None
        self._writer: CacheWriter | None = None

    def setup(self) -> None:
        self._client = self._handler.load_client()
        self._writer = CacheWriter(self._cache_dir, self._handler.cache_kind, self._handler.flush_every,
                                   self._handler.flush_seconds)

    def process(self, batch: list[tuple[str, list[Any]]], allowed_keys: frozenset[str] | None = None) -> Iterator[Any]:
        assert self._client is not None and self._writer is not None
        refused, to_call = split_by_plan(batch, allowed_keys)
        for items in refused:
            yield from self._handler.refuse(items, self._budget_limits)
        if to_call:
            yield from self._handler.call(self._client, to_call, self._writer)

    def finish_bundle(self) -> Iterator[Any]:
        if self._writer is not None:
            self._writer.flush()
        progress.flush()
        yield from self._handler.tally.flush()

    def teardown(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        if self._client is not None:
            self._handler.close_client(self._client)
            self._client = None


def _windowed(output: Any) -> Any:
    """An output of `finish_bundle`, which has no input element to inherit a window from: the run's global window."""
    window = GlobalWindow()
    if isinstance(output, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(output.tag, WindowedValue(output.value, window.max_timestamp(), (window,)))
    return WindowedValue(output, window.max_timestamp(), (window,))


class _CallInFlightFn(_CallMissesFn):
    """The lifecycle of `_CallMissesFn`, with `handler.in_flight` requests always running on the client's event loop.

    `process` starts a batch's request and returns at once with the outputs of whatever has finished meanwhile; when
    every slot is taken it waits for the first answer, not for all of them. `finish_bundle` collects the rest.
    """

    def setup(self) -> None:
        super().setup()
        self._loop = self._client.async_loop()
        if self._loop is None:
            raise TypeError(f"{type(self._client).__name__} has no event loop to keep requests in flight on")
        self._running: dict[concurrent.futures.Future, list[tuple[str, list[Any]]]] = {}

    def process(self, batch: list[tuple[str, list[Any]]], allowed_keys: frozenset[str] | None = None) -> Iterator[Any]:
        refused, to_call = split_by_plan(batch, allowed_keys)
        for items in refused:
            yield from self._handler.refuse(items, self._budget_limits)
        yield from self._collect(wait=False)
        if not to_call:
            return
        while len(self._running) >= self._handler.in_flight:
            yield from self._collect(wait=True)
        self._running[self._loop.submit(self._handler.acall(self._client, to_call))] = to_call

    def _collect(self, wait: bool) -> Iterator[Any]:
        """Outputs of the requests that have finished; with `wait`, of at least one (checking every few seconds
        whether cache entries are due to be written meanwhile)."""
        assert self._writer is not None
        done: set[concurrent.futures.Future] = set()
        while self._running:
            done, _ = concurrent.futures.wait(self._running, timeout=self._handler.flush_seconds if wait else 0,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            if done or not wait:
                break
            self._writer.flush_if_due()
        for future in done:
            yield from self._handler.collect(self._running.pop(future), future, self._writer)
        self._writer.flush_if_due()

    def finish_bundle(self) -> Iterator[Any]:
        while self._running:
            for output in self._collect(wait=True):
                yield _windowed(output)
        yield from super().finish_bundle()

    def teardown(self) -> None:
        # A failed bundle can leave requests running: stop them before the client closes under them.
        for future in getattr(self, "_running", {}):
            future.cancel()
        super().teardown()


class CachedCall(beam.PTransform):
    """Items -> {"main": one output per item (answers, vectors), each of `handler.outputs`, "tallies": summed}.

    With a `RunBudget`, the misses called are the smallest keys whose worst-case cost fits what the stages applied
    before this one left (`RunBudget.plan`); the others are refused, and what the calls spent is recorded for the
    stages after it.
    """

    def __init__(self, handler: CallHandler, cache_dir: str | None, budget: RunBudget | None = None):
        super().__init__()
        self._handler = handler
        self._cache_dir = cache_dir
        self._budget = budget

    def expand(self, items):
        handler = self._handler
        keyed = items | "Key" >> beam.ParDo(_KeyFn(handler))
        split = keyed | "Cache" >> SplitByCache(self._cache_dir, handler.cache_kind, handler.partition,
                                                 f"ReadCache.{handler.stage}")
        hits = split["hits"] | "FromCache" >> beam.ParDo(_FromCacheFn(handler)).with_outputs(TALLIES, main="main")
        misses = split["misses"] | "Order" >> beam.MapTuple(lambda key, items: (key, handler.group(items)))
        allowed = None if self._budget is None else beam.pvalue.AsSingleton(self._plan(misses))
        budget_limits = self._budget.describe() if self._budget else ""
        if handler.batch_mode:
            called = misses | "BatchJobs" >> BatchJobs(handler, self._cache_dir, allowed, budget_limits)
        else:
            called = self._call_online(misses, allowed, budget_limits)
        if self._budget is not None:
            self._record_spend(called[handler.spend_output or "main"])
        outputs = {tag: called[tag] for tag in handler.outputs}
        return {
            **outputs,
            "main": (hits["main"], called["main"]) | "Outputs" >> beam.Flatten(),
            "tallies": sum_tallies((hits[TALLIES], called[TALLIES]), "SumCallTallies"),
        }

    def _call_online(self, misses, allowed, budget_limits):
        """Misses in fixed-size batches, each called batch by batch or kept in flight (see the module docstring)."""
        handler = self._handler
        call_fn = _CallInFlightFn if handler.in_flight else _CallMissesFn
        return (
            misses
            # Fixed-size batches from the start, not BatchElements' ramp from 1: the handler's size is what its
            # backend takes at once (see each handler), and the last batch of a bundle may be smaller.
            | "Batch" >> beam.BatchElements(min_batch_size=handler.batch_size, max_batch_size=handler.batch_size)
            | "Call" >> beam.ParDo(call_fn(handler, self._cache_dir, budget_limits), allowed).with_outputs(
                TALLIES, *handler.outputs, main="main")
        )

    def _plan(self, misses):
        """The set of miss keys this stage may call, once the earlier stages' spending is known."""
        handler = self._handler
        candidates = misses | "WorstCase" >> beam.MapTuple(
            lambda key, items: (key, handler.worst_case_micro_usd(items)))
        return self._budget.plan(candidates, counts_calls=handler.counts_calls)

    def _record_spend(self, spending) -> None:
        handler = self._handler
        spent_here = (
            spending
            | "Spent" >> beam.Map(handler.spend)
            | "Paid" >> beam.Filter(lambda spend: spend is not None)
            | "StageSpend" >> beam.CombineGlobally(add_spends)
        )
        self._budget.record(spent_here)
