"""Stage 5, EmbedTeacher: teacher embeddings for every query and passage, through the content-addressed cache.

Input: PCollection of text items `{"id": str, "text": str, "task_type": TaskType value}` (queries as RETRIEVAL_QUERY,
passages as RETRIEVAL_DOCUMENT). Output: `{"kept": {"id", "task_type", "embedding": list[float]}, "rejected": ...}`,
exactly one output per input item. Rejects: `embedding_failed` (the backend failed after its retries; never cached),
`skipped_by_budget` (the run's `--max-cost` left the text unembedded; a later run with a larger budget embeds it).

The cache key is sha256 over model id, model version, task type, requested dimension and the text's sha256, so the same
text embedded for another task type or dimension is a different entry. Identical texts in one run are embedded once.

With a `RunBudget` that caps cost and a teacher with a price (gemini-embedding-001), the cache misses embedded are the
smallest keys whose estimated cost fits what the stages before this one left (the same planner as `CallLLM`), and
what they cost is added to the run's spend for the stages after it. They are not LLM calls: `max_llm_calls` does not
count them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from pipelines import progress
from pipelines.cache import EMBEDDING_CACHE, CacheWriter, SplitByCache
from pipelines.clients.base import Embedder, TaskType, Usage
from pipelines.clients.factory import build_embedder
from pipelines.clients.specs import EmbedderSpec
from pipelines.llm_calls import BUDGET_REASON, Spend, add_spends, upper_token_estimate
from pipelines.model_access import ModelAccess, ModelIdentity
from pipelines.pricing import estimated_cost_micro_usd, price_per_million
from pipelines.stages import StageCounters, rejected_row

STAGE = "embed_teacher"


@dataclass(frozen=True)
class EmbedTeacherConfig:
    #: Matryoshka dimension of the stored teacher vectors; None keeps the model's full dimension.
    dimension: int | None = None
    #: Texts per backend call; the local embedder batches on its own device, Gemini sends one request per text.
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


def estimated_embedding_usage(model: str, text: str) -> tuple[int, int]:
    """(input tokens, micro-USD) of embedding one text, estimated from above.

    The embedding API answers with vectors only, no token counts, so the spend is priced the same way it is planned:
    the text at UTF-8 bytes / 3 tokens, more than prose or code holds (see BYTES_PER_TOKEN_LOWER_BOUND). Planning and
    recording with one figure keeps the run's spend an upper bound of what was billed. The cost is rounded up to a
    whole micro-dollar per text, so a short query (10 tokens, 1.5 micro-USD) counts up to 1 micro-USD more: the budget
    errs on the side of stopping early.
    """
    tokens = upper_token_estimate([text])
    return tokens, estimated_cost_micro_usd(model, Usage(tokens, 0))


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


class _EmbedMissesFn(beam.DoFn):
    """Embeds a batch of missed texts (one task type per backend call) and caches the vectors.

    Texts whose key is not in `allowed_keys` (when given) are rejected as skipped by the budget, not sent. Every text
    sent goes to the "sent" output as its estimated (input tokens, micro-USD).
    """

    def __init__(self, spec: EmbedderSpec, identity: ModelIdentity, config: EmbedTeacherConfig, cache_dir: str | None,
                 budget_limits: str = ""):
        self._spec = spec
        self._model_id, self._model_version = identity
        self._config = config
        self._cache_dir = cache_dir
        self._budget_limits = budget_limits
        self._embedder: Embedder | None = None
        self._writer: CacheWriter | None = None
        self._counters = StageCounters(STAGE)
        self._calls = beam.metrics.Metrics.counter(f"embforge.{STAGE}", "texts_embedded")

    def setup(self) -> None:
        self._embedder = build_embedder(self._spec)
        self._writer = CacheWriter(self._cache_dir, EMBEDDING_CACHE, flush_every=1024)

    def process(self, batch: list[tuple[str, list[dict[str, Any]]]],
                allowed_keys: frozenset[str] | None = None) -> Iterator[Any]:
        assert self._embedder is not None and self._writer is not None
        by_task: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
        for key, items in batch:
            if allowed_keys is not None and key not in allowed_keys:
                for item in items:
                    self._counters.reject(BUDGET_REASON)
                    yield beam.pvalue.TaggedOutput("rejected", rejected_row(
                        STAGE, BUDGET_REASON, item, record_id=item["id"],
                        detail=f"not embedded: the run's budget ({self._budget_limits}) is spent"))
                continue
            by_task.setdefault(items[0]["task_type"], []).append((key, items))
        for task_type, groups in by_task.items():
            texts = [items[0]["text"] for _, items in groups]
            # Counted as spent whether or not the batch succeeds: a batch fails as a whole, after some of its texts
            # may have been answered (and billed).
            for text in texts:
                yield beam.pvalue.TaggedOutput("sent", estimated_embedding_usage(self._spec.model_name, text))
            try:
                vectors = self._embedder.embed(texts, TaskType(task_type), self._config.dimension)
            except Exception as error:  # noqa: BLE001 - after the client's own retries, a failure is a rejected row
                for _, items in groups:
                    for item in items:
                        self._counters.reject("embedding_failed")
                        yield beam.pvalue.TaggedOutput(
                            "rejected",
                            rejected_row(STAGE, "embedding_failed", item, record_id=item["id"],
                                         detail=f"{type(error).__name__}: {error}"),
                        )
                continue
            self._calls.inc(len(texts))
            progress.advance("teacher embeddings", len(texts))
            for (key, items), vector in zip(groups, vectors, strict=True):
                self._writer.add(cache_entry(key, self._model_id, self._model_version, task_type, items[0]["text"],
                                             vector))
                embedding = [float(x) for x in vector]
                for item in items:
                    yield {"id": item["id"], "task_type": task_type, "embedding": embedding}

    def finish_bundle(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        progress.flush()

    def teardown(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        if self._embedder is not None:
            self._embedder.close()


class EmbedTeacher(beam.PTransform):
    """Text items -> {"kept": embeddings, "rejected": failures and texts skipped by the budget, "texts_embedded": count,
    "cache_hits": count, "sent": (estimated input tokens, micro-USD) per distinct text sent to the backend}."""

    def __init__(self, access: ModelAccess, config: EmbedTeacherConfig = EmbedTeacherConfig()):
        super().__init__()
        spec, budget = access.spec, access.budget
        self._spec = spec
        self._config = config
        self._cache_dir = access.cache_dir
        self._identity = access.identity
        # Only a cost limit applies to embeddings, and only a priced teacher can reach it: a local teacher costs 0,
        # so planning it would hold every key in memory to allow them all.
        priced = price_per_million(spec.model_name) != (0.0, 0.0)
        self._budget = budget if budget is not None and budget.max_micro_usd is not None and priced else None

    def expand(self, items):
        model_id, model_version = self._identity
        dimension = self._config.dimension
        keyed = items | "Key" >> beam.Map(
            lambda item: (embedding_cache_key(model_id, model_version, item["task_type"], dimension, item["text"]),
                          item)
        )
        split = keyed | "Cache" >> SplitByCache(self._cache_dir, EMBEDDING_CACHE, "ReadEmbeddingCache")
        hits = split["hits"] | "FromCache" >> beam.FlatMap(
            lambda hit: [{"id": item["id"], "task_type": item["task_type"], "embedding": hit[1]["embedding"]}
                         for item in hit[0]])
        allowed = None if self._budget is None else beam.pvalue.AsSingleton(self._plan(split["misses"]))
        embedded = (
            split["misses"]
            # Fixed-size batches, not BatchElements' default ramp from 1: on a busy CPU a forward pass of 1-2 texts
            # costs nearly as much as one of 32 (torch's threads wait on each other at every op), and an API
            # backend keeps only a batch's worth of requests in flight. The last batch of a bundle may be smaller.
            | "Batch" >> beam.BatchElements(min_batch_size=self._config.batch_size,
                                            max_batch_size=self._config.batch_size)
            | "Embed" >> beam.ParDo(
                _EmbedMissesFn(self._spec, self._identity, self._config, self._cache_dir,
                               self._budget.describe() if self._budget else ""), allowed).with_outputs(
                "rejected", "sent", main="kept")
        )
        if self._budget is not None:
            self._budget.record(
                embedded["sent"]
                | "Spend" >> beam.MapTuple(lambda _, micro_usd: Spend(0, micro_usd))
                | "StageSpend" >> beam.CombineGlobally(add_spends))
        return {
            "kept": (hits, embedded["kept"]) | "Embeddings" >> beam.Flatten(),
            "rejected": embedded["rejected"],
            # Distinct texts sent to the backend, and items answered from the cache.
            "texts_embedded": embedded["sent"] | "CountSent" >> beam.combiners.Count.Globally(),
            "cache_hits": hits | "CountHits" >> beam.combiners.Count.Globally(),
            "sent": embedded["sent"],
        }

    def _plan(self, misses):
        """The set of miss keys this stage may embed: each text priced as `estimated_embedding_usage` prices it."""
        model = self._spec.model_name
        candidates = misses | "EstimatedCost" >> beam.MapTuple(
            lambda key, items: (key, estimated_embedding_usage(model, items[0]["text"])[1]))
        # Embeddings are not LLM calls: only the cost limit applies to them.
        return self._budget.plan(candidates, counts_calls=False)


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
    """EmbedTeacher's kept items -> (id, embedding) of those embedded as `task_type`: how a stage picks the vectors it
    reads (the queries', or the passages') out of all the run's teacher vectors."""

    def __init__(self, task_type: TaskType):
        super().__init__()
        self._task_type = task_type.value

    def expand(self, vectors):
        task_type = self._task_type
        return (
            vectors
            | "OfTaskType" >> beam.Filter(lambda item: item["task_type"] == task_type)
            | "ById" >> beam.Map(lambda item: (item["id"], item["embedding"]))
        )
