"""Stage 3, EmbedTeacher: teacher embeddings for every query and passage, through the content-addressed cache.

Input: PCollection of text items `{"id": str, "text": str, "task_type": TaskType value}` (queries as RETRIEVAL_QUERY,
passages as RETRIEVAL_DOCUMENT; `RetrievalTexts` makes them). Output: `{"kept": {"id", "task_type", "embedding":
float32 bytes (`pipelines.sharded_search.pack_vector`)}, "rejected": ..., "tallies": ...}`, exactly one kept or rejected
row per input item; a stage that reads the vectors picks its task type's with `TeacherVectors`. Vectors stay float32
bytes from the embedder's array or the cache's Arrow column to the search: a million 768-d vectors as Python float lists
would be 768M float objects. Rejects: `embedding_failed` (the backend failed after its
retries; never cached), `skipped_by_budget` (the run's `--max-cost` left the text unembedded; a later run with a larger
budget embeds it).

The cache key is sha256 over model id, model version, task type, requested dimension and the text's sha256, so the same
text embedded for another task type or dimension is a different entry. Identical texts in one run are embedded once.

With a `RunBudget` that caps cost and a teacher with a price (gemini-embedding-001), the cache misses embedded are the
smallest keys whose estimated cost fits what the stages before this one left (the same planner as `CallLLM`), and
what they cost is added to the run's spend for the stages after it. They are not LLM calls: `max_llm_calls` does not
count them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines import progress
from pipelines.accounting import CountRows, sum_tallies
from pipelines.budget import BUDGET_REASON, Spend, upper_token_estimate
from pipelines.cache import EMBEDDING_CACHE, CacheWriter, embedding_partition
from pipelines.cached_calls import CachedCall, CallHandler
from pipelines.clients.base import Embedder, TaskType, Usage, truncate_and_normalize
from pipelines.clients.factory import build_batch_client, build_embedder
from pipelines.clients.specs import CallMode, EmbedderSpec
from pipelines.model_access import ModelAccess, ModelIdentity
from pipelines.pricing import estimated_cost_micro_usd, is_priced
from pipelines.sharded_search import pack_vector
from pipelines.stages import rejected_row

STAGE = "embed_teacher"


@dataclass(frozen=True)
class EmbedTeacherConfig:
    #: Matryoshka dimension of the stored teacher vectors; None keeps the model's full dimension.
    dimension: int | None = None
    #: Texts per backend call: a batch on the local embedder's device, one batchEmbedContents request on Gemini (which
    #: takes at most 100 texts a request: larger batches are split).
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.dimension is not None and self.dimension < 1:
            raise ValueError(f"dimension must be >= 1 or unset, got {self.dimension}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def embedding_cache_key(model_id: str, model_version: str, task_type: str, dimension: int | None, text: str) -> str:
    material = [model_id, model_version, task_type, dimension or 0, text_sha256(text)]
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()


def estimated_embedding_usage(spec: EmbedderSpec, text: str, mode: CallMode = "online") -> tuple[int, int]:
    """(input tokens, micro-USD) of embedding one text, estimated from above.

    The embedding API answers with vectors only, no token counts, so the spend is priced the same way it is planned:
    the text at UTF-8 bytes / 3 tokens, more than prose or code holds (see BYTES_PER_TOKEN_LOWER_BOUND). Planning and
    recording with one figure keeps the run's spend an upper bound of what was billed. The cost is rounded up to a
    whole micro-dollar per text, so a short query (10 tokens, 1.5 micro-USD) counts up to 1 micro-USD more: the budget
    errs on the side of stopping early. `mode` is how the text was sent: online, or in a Batch API job (half price).
    """
    tokens = upper_token_estimate([text])
    return tokens, estimated_cost_micro_usd(spec, Usage(tokens, 0), mode=mode)


def cache_entry(key: str, model_id: str, model_version: str, task_type: str, text: str, vector) -> dict[str, Any]:
    return {
        "key": key,
        "model_id": model_id,
        "model_version": model_version,
        "task_type": task_type,
        "dimension": len(vector),
        "text_sha256": text_sha256(text),
        "embedding": [float(x) for x in vector],
    }


def usage_tallies(stage: str, sent: tuple[int, int]) -> Iterator[tuple[tuple[str, ...], int]]:
    """The manifest tallies of one text sent to the teacher: its estimated tokens and cost (the API reports neither)."""
    tokens, micro_usd = sent
    yield ("embedding", stage, "texts_embedded"), 1
    yield ("embedding", stage, "estimated_input_tokens"), tokens
    yield ("cost", stage), micro_usd
    yield ("cache", "embeddings_computed"), 1


def _hit_tallies(stage: str, count: int) -> Iterator[tuple[tuple[str, ...], int]]:
    yield ("embedding", stage, "cache_hits"), count
    yield ("cache", "embedding_hits"), count


def _baseline_tallies(stage: str) -> list[tuple[tuple[str, ...], int]]:
    """Zero counts of the usage every run reports, so the manifest shows them even when nothing was embedded or hit."""
    return [*_hit_tallies(stage, 0), (("embedding", stage, "texts_embedded"), 0),
            (("embedding", stage, "skipped_by_budget"), 0), (("cache", "embeddings_computed"), 0)]


def _by_task_type(batch: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, list[tuple[str, list[dict[str, Any]]]]]:
    """A batch's keys by task type: one backend call embeds texts of one task type."""
    by_task: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    for key, items in batch:
        by_task.setdefault(items[0]["task_type"], []).append((key, items))
    return by_task


class TeacherCallHandler(CallHandler):
    """The teacher behind `CachedCall`: texts keyed by `embedding_cache_key`, misses embedded one task type per backend
    call. Every text sent goes to the "sent" output as its estimated (input tokens, micro-USD), and into the usage
    tallies with the cache hits and the texts the budget skipped.
    """

    cache_kind = EMBEDDING_CACHE
    #: Vectors are cheap to recompute next to LLM answers: flush rarely, in few large files.
    flush_every = 1024
    outputs = ("rejected", "sent")
    spend_output = "sent"
    # Embeddings are not LLM calls: only the cost limit applies to them.
    counts_calls = False

    def __init__(self, stage: str, spec: EmbedderSpec, identity: ModelIdentity, config: EmbedTeacherConfig):
        # Fixed-size batches: on a busy CPU a forward pass of 1-2 texts costs nearly as much as one of 32 (torch's
        # threads wait on each other at every op). Gemini takes a batch as one batchEmbedContents request, and keeps
        # `concurrency` such requests always in flight (cached_calls.py).
        super().__init__(stage, identity, config.batch_size)
        if spec.backend == "gemini":
            self.in_flight = spec.concurrency
        self.spec = spec
        self.batch_mode = spec.mode == "batch"
        self.batch_max_requests = spec.batch.max_requests
        self.batch_embeddings = True
        self.config = config
        self._embedded = beam.metrics.Metrics.counter(f"embforge.{stage}", "texts_embedded")

    def key(self, item: dict[str, Any]) -> str:
        return embedding_cache_key(*self.identity, item["task_type"], self.config.dimension, item["text"])

    def partition(self, item: dict[str, Any]) -> str:
        return embedding_partition(*self.identity, item["task_type"])

    def from_cache(self, items: list[dict[str, Any]], entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for key, count in _hit_tallies(self.stage, len(items)):
            self.tally.add(key, count)
        for item in items:
            yield {"id": item["id"], "task_type": item["task_type"], "embedding": entry["embedding"]}

    def worst_case_micro_usd(self, items: list[dict[str, Any]]) -> int:
        """Each text priced as `estimated_embedding_usage` prices it (planned and recorded with one figure); in batch
        mode its batch line, then an online request should the line fail."""
        online = estimated_embedding_usage(self.spec, items[0]["text"])[1]
        if not self.batch_mode:
            return online
        return online + estimated_embedding_usage(self.spec, items[0]["text"], "batch")[1]

    def refuse(self, items: list[dict[str, Any]], budget_limits: str) -> Iterator[Any]:
        for item in items:
            self.tally.add(("embedding", self.stage, "skipped_by_budget"))
            yield beam.pvalue.TaggedOutput("rejected", rejected_row(
                self.stage, BUDGET_REASON, item, record_id=item["id"],
                detail=f"not embedded: the run's budget ({budget_limits}) is spent"))

    def load_client(self) -> Embedder:
        return build_embedder(self.spec)

    def call(self, embedder: Embedder, batch: list[tuple[str, list[dict[str, Any]]]],
             cache: CacheWriter) -> Iterator[Any]:
        for task_type, groups in _by_task_type(batch).items():
            try:
                vectors = embedder.embed([items[0]["text"] for _, items in groups], TaskType(task_type),
                                         self.config.dimension)
            except Exception as error:  # noqa: BLE001 - after the client's own retries, a failure is a rejected row
                vectors = error
            yield from self._outputs(task_type, groups, vectors, cache)

    async def acall(self, embedder: Embedder,
                    batch: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, np.ndarray | Exception]:
        """Each task type's vectors, or the error that stopped them (a rejected row each, never a stopped run)."""
        vectors: dict[str, np.ndarray | Exception] = {}
        for task_type, groups in _by_task_type(batch).items():
            try:
                vectors[task_type] = await embedder.aembed([items[0]["text"] for _, items in groups],
                                                           TaskType(task_type), self.config.dimension)
            except Exception as error:  # noqa: BLE001 - after the client's own retries, a failure is a rejected row
                vectors[task_type] = error
        return vectors

    def collect(self, batch: list[tuple[str, list[dict[str, Any]]]], answer: concurrent.futures.Future,
                cache: CacheWriter) -> Iterator[Any]:
        vectors = answer.result()
        for task_type, groups in _by_task_type(batch).items():
            yield from self._outputs(task_type, groups, vectors[task_type], cache)

    def load_batch_client(self) -> Any:
        return build_batch_client(self.spec)

    def batch_line(self, key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        from pipelines.clients.gemini_batch import embed_request_line

        return embed_request_line(key, items[0]["text"], items[0]["task_type"], self.config.dimension)

    def answer_batch(self, embedder: Embedder, answered: list[tuple[str, list[dict[str, Any]], dict[str, Any] | None]],
                     cache: CacheWriter) -> tuple[list[Any], int]:
        from pipelines.clients.gemini_batch import line_error

        outputs: list[Any] = []
        by_task: dict[str, list[tuple[tuple[str, list[dict[str, Any]]], list[float]]]] = {}
        online = []
        dimension = self.config.dimension or embedder.native_dimension
        for key, items, line in answered:
            values = line["response"].get("embedding", {}).get("values", []) if line_error(line) is None else []
            if len(values) < dimension:
                online.append((key, items))  # a failed line, or no full vector: embedded online
            else:
                by_task.setdefault(items[0]["task_type"], []).append(((key, items), values[:dimension]))
        for task_type, embedded in by_task.items():
            vectors = truncate_and_normalize(np.asarray([values for _, values in embedded], dtype=np.float32),
                                             dimension)
            outputs += self._outputs(task_type, [group for group, _ in embedded], vectors, cache, "batch")
        if online:
            outputs += self.call(embedder, online, cache)
        return outputs, len(online)

    def _outputs(self, task_type: str, groups: list[tuple[str, list[dict[str, Any]]]],
                 vectors: np.ndarray | Exception, cache: CacheWriter, mode: CallMode = "online") -> Iterator[Any]:
        """The outputs of one task type's texts sent together: their vectors (cached), or one rejection per item."""
        # Counted as spent whether or not the request succeeded: it fails as a whole, after some of its texts may have
        # been answered (and billed).
        for _, items in groups:
            sent = estimated_embedding_usage(self.spec, items[0]["text"], mode)
            for key, count in usage_tallies(self.stage, sent):
                self.tally.add(key, count)
            yield beam.pvalue.TaggedOutput("sent", sent)
        if isinstance(vectors, Exception):
            for _, items in groups:
                for item in items:
                    yield beam.pvalue.TaggedOutput("rejected", rejected_row(
                        self.stage, "embedding_failed", item, record_id=item["id"],
                        detail=f"{type(vectors).__name__}: {vectors}"))
            return
        self._embedded.inc(len(groups))
        progress.advance("teacher embeddings", len(groups))
        for (key, items), vector in zip(groups, vectors, strict=True):
            cache.add(cache_entry(key, *self.identity, task_type, items[0]["text"], vector))
            embedding = pack_vector(vector)
            for item in items:
                yield {"id": item["id"], "task_type": task_type, "embedding": embedding}

    def spend(self, sent: tuple[int, int]) -> Spend:
        return Spend(0, sent[1])


class EmbedTeacher(beam.PTransform):
    """Text items -> {"kept": embeddings, "rejected": failures and texts skipped by the budget, "tallies": the rows and
    the teacher's usage (texts embedded, cache hits, texts skipped by the budget, estimated tokens and cost), summed}.

    `stage` names the counters, the tallies and the rejected rows: the run's own stage by default; the label judge
    embeds under its own name.
    """

    def __init__(self, access: ModelAccess, config: EmbedTeacherConfig = EmbedTeacherConfig(), stage: str = STAGE):
        super().__init__()
        self._access = access
        self._config = config
        self._stage = stage

    def expand(self, items):
        access = self._access
        budget = access.budget
        # Only a cost limit applies to embeddings, and only a priced teacher can reach it: a local teacher costs 0,
        # so planning it would hold every key in memory to allow them all.
        if budget is None or budget.max_micro_usd is None or not is_priced(access.spec):
            budget = None
        handler = TeacherCallHandler(self._stage, access.spec, access.identity, self._config)
        entering = items | "CountInput" >> CountRows(self._stage, "input")
        called = entering["rows"] | "Embed" >> CachedCall(handler, access.cache_dir, budget)
        kept = called["main"] | "CountKept" >> CountRows(self._stage, "kept")
        rejected = called["rejected"] | "CountRejected" >> CountRows(self._stage, "rejected")
        baseline = items.pipeline | "UsageBaseline" >> beam.Create(_baseline_tallies(self._stage))
        tallies = (baseline, entering["tallies"], called["tallies"], kept["tallies"], rejected["tallies"])
        return {"kept": kept["rows"], "rejected": rejected["rows"], "tallies": sum_tallies(tallies)}


class RetrievalTexts(beam.PTransform):
    """{"passages": PASSAGE rows, "pairs": PAIR rows} -> the text items EmbedTeacher embeds: every passage as a
    document, every generated query as a query, each under its row's id."""

    def expand(self, inputs):
        return (
            inputs["passages"] | "PassageTexts" >> beam.Map(
                lambda row: {"id": row["passage_id"], "text": row["text"],
                             "task_type": TaskType.RETRIEVAL_DOCUMENT.value}),
            inputs["pairs"] | "QueryTexts" >> beam.Map(
                lambda row: {"id": row["pair_id"], "text": row["query"], "task_type": TaskType.RETRIEVAL_QUERY.value}),
        ) | "AllTexts" >> beam.Flatten()


class TeacherVectors(beam.PTransform):
    """EmbedTeacher's kept items -> (id, embedding as float32 bytes, `pack_vector`) of those embedded as `task_type`:
    how a stage picks the vectors it reads (the queries', or the passages') out of all the run's teacher vectors.

    Packed right where they are picked, fused with EmbedTeacher's output: from here through the joins and the search a
    vector is 4 bytes a component, not a list of Python floats (about 12 kB per 384-d vector in memory, 3.5 kB coded).
    """

    def __init__(self, task_type: TaskType):
        super().__init__()
        self._task_type = task_type.value

    def expand(self, vectors):
        task_type = self._task_type
        return (
            vectors
            | "OfTaskType" >> beam.Filter(lambda item: item["task_type"] == task_type)
            | "ById" >> beam.Map(lambda item: (item["id"], pack_vector(item["embedding"])))
        )
