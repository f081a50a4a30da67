"""Top-k inner-product search over a corpus sharded across workers: the search, not a stage.

MineNegatives (hard negatives) and GradeRelevance (the round-trip check) both search the teacher's vectors with it, so
it lives outside both. Exact by default, not HNSW/IVF: their recall depends on the data, and a missed neighbour is a
silently easier negative; the exact search is also what makes sharded and unsharded runs identical. Scores are
recomputed exactly (see `search_shard_rows`), and ties are broken by passage_id, so the top-k does not depend on how the
corpus was sharded.

For corpora where exact search costs too much, `IndexSettings` names any faiss index factory string ("IVF4096,Flat",
"HNSW32,Flat", "IVF4096,PQ64", ...) with its search-time `nprobe` / `efSearch`. Each shard then builds that index from
its passages (training it on them first) next to the exact store of their vectors, fetches candidates from it and
rescores them exactly like the exact search, so scores and tie order are the same; only the candidates may miss true
neighbours. Its recall on real embeddings is measured in benchmarks/ann_recall.py (RESULTS.md). Approximate shards are
as large as `MAX_SHARD_PASSAGES` allows (an IVF index needs tens of vectors per list to train), and the results depend
on the sharding, which the exact search's do not. Each (shard, query group) builds and trains its own copy of the
shard's index, so more query groups cost more index builds.

How the sharded search runs in Beam (the index must not have to fit one worker, nor the corpus one shuffle buffer):

- Passage vectors, passage texts and query vectors are written to spill files (pipelines/search_spill.py), fused
  with the step that produced them: Arrow IPC files of a bundle's rows each, sorted by a stable 62-bit hash of the id.
  From there on the search's shuffle moves file descriptors (a path and each record batch's hash range), not vectors:
  Beam's in-process runners hold a GroupByKey's whole input in memory, and sending the corpus's vectors through it
  held them once per query group (1M x 384-d peaked at 11.9 GB on one machine before, RESULTS.md).
- The corpus and the queries are counted (from the files' row counts), and `search_plan` gives `num_shards =
  ceil(size / shard_size)` and the query groups, or, unset, chooses them: one shard up to 100k passages (at most 1M a
  shard), from 100k on about 25k passages a shard (at most 16 shards) so that the search spreads over workers, and a
  query group per 100k queries. Shard s of S holds the passages whose `routing_hash("shard", passage_id)` lies in the
  s-th of S equal slices of the hash space (`hash_range`): no global ordering is needed, the files can be written
  before the count, and at the scale where sharding matters hash shards are within a fraction of a percent of
  `shard_size` (1M ± ~1k).
- Queries are split into `query_groups` groups the same way, by a hash of pair_id. The search unit is a (shard, query
  group) key: each file's batches overlapping a shard's (or a group's) range are routed to it, once per query group
  (once per shard), and one GroupByKey puts a shard's passage parts and a group's query parts on the same worker,
  which reads them, builds the shard's index and searches the group's queries in batches of `query_batch_size`.
- Passages' texts are spilled apart from their vectors and joined with them inside the shard (a passage without a
  text is left out), so the caller needs no join of passages with vectors. Hits come out with their texts (plus their
  vectors when `keep_embeddings`), and a query that carries no positive_embedding asks for its positive's vector,
  which the shard holding it returns: no join of hits with the corpus afterwards either.
- Tradeoffs, for a corpus of P passages of T bytes of text and Q queries of dimension d: the spill writes `(4d + T) *
  P + 4d * Q` bytes once, and each (shard, group) reads its shard's rows and its group's (plus at most one batch per
  file and range end), so the corpus is read `query_groups` times and the queries `num_shards` times; a worker holds
  one shard (`(4d + T) * shard_size`) plus one group's query vectors (`4d * Q / query_groups`); parallelism is
  `num_shards * query_groups`. Larger shards mean fewer query reads but more memory per worker; more query groups
  mean more parallelism and smaller query buffers at the cost of more corpus reads. 10M passages x 768 dims with the
  default 1M shards: 10 shards of ~3 GB of vectors (plus ~1 GB of text at 1 kB a passage). The alternatives are
  worse: queries as a side input broadcast all of them to every worker, and the index as a side input needs the
  whole corpus on every worker. The spill folder is deleted once every (shard, group) is searched; a run killed
  before leaves it in its temp location.
- Each (shard, group) emits, per query, its shard's top-k (`SearchShards`); the caller merges them per query
  (`merge_topk` order, ties by passage_id), with a `CombinePerKey` that the runner runs in the search's bundles:
  `ShardedTopK` (`_TopHitsFn`), MineNegatives (`MergeShardResults`) before its join with the query rows.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import faiss
import numpy as np
import pyarrow as pa

from pipelines.search_spill import (
    ID,
    QUERY_GROUP_SALT,
    SHARD_SALT,
    VECTOR,
    SpillFile,
    SpillFn,
    hash_range,
    read_spilled,
    remove_spill_folder,
    spill_folder,
    vector_matrix,
)

#: Faiss fetches this many hits beyond k at first, so scores near the k-th rarely need a second, larger search.
_TIE_SLACK = 8
#: Queries rescored together: bounds the float64 gather to 64 x fetch x d (about 16 MB at fetch 40, d 768).
_RESCORE_BLOCK = 64
#: Queries per faiss search call (see MineNegativesConfig.query_batch_size).
DEFAULT_QUERY_BATCH_SIZE = 16_384

#: A hit as `SearchShards` emits it: (passage_id, text or None, exact score, float32 embedding bytes or None).
ShardHit = tuple[str, "str | None", float, "bytes | None"]

# --- Vectors and exact scores -----------------------------------------------------------------------------------------


def pack_vector(vector: bytes | Sequence[float] | np.ndarray) -> bytes:
    """A vector as float32 bytes: 4 bytes a component through shuffles instead of ~9 for pickled Python floats (bytes
    are taken as already packed)."""
    if isinstance(vector, bytes):
        return vector
    return np.asarray(vector, dtype=np.float32).tobytes()


def unpack_vector(blob: bytes) -> list[float]:
    return np.frombuffer(blob, dtype=np.float32).tolist()


def pack_vector_column(column: pa.ChunkedArray | pa.ListArray) -> list[bytes]:
    """An Arrow list<float32> column (a cache file's or a Parquet file's vectors) as one `pack_vector` byte string per
    row, sliced out of the column's flat values: no Python float is made per component."""
    vectors = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = np.asarray(vectors.values.to_numpy(zero_copy_only=False), dtype=np.float32)
    offsets = vectors.offsets.to_numpy()
    return [values[start:end].tobytes() for start, end in zip(offsets[:-1], offsets[1:], strict=True)]


def vector_array(vector: bytes | Sequence[float] | np.ndarray) -> np.ndarray:
    """A vector as a float32 array, from `pack_vector` bytes (read in place, no copy), a list or an array."""
    if isinstance(vector, bytes):
        return np.frombuffer(vector, dtype=np.float32)
    return np.asarray(vector, dtype=np.float32)


def vector_dimension(vector: bytes | Sequence[float] | np.ndarray) -> int:
    return len(vector) // 4 if isinstance(vector, bytes) else len(vector)


def exact_scores(queries: np.ndarray, passages: np.ndarray) -> np.ndarray:
    """Inner products of float32 vectors, computed so the value of a pair never depends on what it is batched with.

    Products of two float32 are exact in float64, and numpy sums each row along its contiguous last axis in the same
    pairwise order whatever the other rows are. faiss's own float32 scores vary in the last bits with the batch shape
    (BLAS or SIMD path, blocking), which would let shard boundaries change the order of near-ties.
    `queries` (..., d) broadcasts against `passages` (..., d).
    """
    return (np.asarray(passages, dtype=np.float64) * np.asarray(queries, dtype=np.float64)).sum(axis=-1)


def teacher_score(query_embedding: bytes | Sequence[float], passage_embedding: bytes | Sequence[float]) -> float:
    """The teacher's score of one pair, bit-identical to the score the search gives the same two vectors."""
    query = vector_array(query_embedding)
    passage = vector_array(passage_embedding)
    if query.shape != passage.shape:
        raise ValueError(f"embedding dimensions differ: {query.shape[0]} vs {passage.shape[0]}")
    return float(exact_scores(query, passage))


def num_shards_for(corpus_size: int, shard_size: int) -> int:
    return max(1, math.ceil(corpus_size / shard_size))


#: A shard's most passages: 1M x 768 float32 is about 3 GB (plus the shard's texts), what a standard worker holds with
#: room for faiss.
MAX_SHARD_PASSAGES = 1_000_000
#: From this corpus size on, the search is split for parallelism even where one shard would fit: a single (shard,
#: group) key is one `process()` call on one worker, however many workers the runner has.
PARALLEL_FROM_PASSAGES = 100_000
#: ... into shards of about this many passages (100k passages: 4 search units), at most MAX_AUTO_SHARDS of them (each
#: shard receives every query of its group once more).
PASSAGES_PER_AUTO_SHARD = 25_000
MAX_AUTO_SHARDS = 16
#: Queries per automatic query group: a worker holds one group's query vectors (100k x 768 float32: 300 MB).
QUERIES_PER_AUTO_GROUP = 100_000
#: The exact search's factory string.
EXACT_INDEX = "Flat"


class IndexSettings(NamedTuple):
    """Which faiss index each shard searches: `factory` is a faiss index factory string ("Flat": exact), with the
    search-time parameters of IVF (`nprobe`: lists searched) and HNSW (`ef_search`: candidate list size) indexes."""

    factory: str = EXACT_INDEX
    nprobe: int | None = None
    ef_search: int | None = None

    @property
    def exact(self) -> bool:
        return self.factory == EXACT_INDEX

    def problems(self) -> list[str]:
        """What is wrong with the settings, as config errors (empty when they are usable)."""
        problems = []
        if not self.exact and not _factory_parses(self.factory):
            problems.append(f"index {self.factory!r} is not a faiss index factory string (e.g. 'Flat', "
                            "'IVF4096,Flat', 'HNSW32,Flat', 'IVF4096,PQ64')")
        if self.nprobe is not None and (self.nprobe < 1 or "IVF" not in self.factory):
            problems.append(f"nprobe applies to an IVF index with nprobe >= 1, got nprobe={self.nprobe} for index "
                            f"{self.factory!r}")
        if self.ef_search is not None and (self.ef_search < 1 or "HNSW" not in self.factory):
            problems.append(f"ef_search applies to an HNSW index with ef_search >= 1, got ef_search={self.ef_search} "
                            f"for index {self.factory!r}")
        return problems


#: The default: exact search.
EXACT = IndexSettings()


def _factory_parses(factory: str) -> bool:
    """Whether faiss builds `factory` for some common embedding dimension. The real dimension is only known from the
    vectors (a product quantizer's sub-vector count must divide it); this catches a misspelt string before the run
    pays for its LLM calls, and the shard reports what the real dimension rejects."""
    for dimension in (768, 1024, 384, 512, 256, 3072, 64):
        try:
            faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError:
            continue
        return True
    return False


def search_plan(passages: int, queries: int, shard_size: int | None = None,
                query_groups: int | None = None, approximate: bool = False) -> tuple[int, int]:
    """(shards, query groups) of a search over `passages` x `queries`: what the config says, else chosen from the
    counts so that a corpus of 100k passages or more splits into several independent search units (an exact search's;
    an approximate index is built per shard, so its shards stay as large as allowed and only queries are split)."""
    if shard_size is not None:
        shards = num_shards_for(passages, shard_size)
    else:
        shards = num_shards_for(passages, MAX_SHARD_PASSAGES)
        if passages >= PARALLEL_FROM_PASSAGES and not approximate:
            shards = max(shards, min(MAX_AUTO_SHARDS, passages // PASSAGES_PER_AUTO_SHARD))
    groups = query_groups if query_groups is not None else max(1, math.ceil(queries / QUERIES_PER_AUTO_GROUP))
    return shards, groups


# --- Search -----------------------------------------------------------------------------------------------------------


class Hit(NamedTuple):
    passage_id: str
    score: float


def hit_order(hit: Hit) -> tuple[float, str]:
    """Hardest first; equal scores by passage_id, so every sharding of the corpus gives the same order."""
    return (-hit.score, hit.passage_id)


class ShardIndex:
    """One shard of the corpus: an exact inner-product faiss index (the store of its vectors), the passage ids (and
    texts, when the search hands them out with its hits) by row, the largest vector norm; with approximate `settings`
    also that index, built from the store at the first search."""

    def __init__(self, dimension: int, settings: IndexSettings = EXACT):
        self.index = faiss.IndexFlatIP(dimension)
        self.settings = settings
        self.passage_ids: list[str] = []
        self.texts: list[str] = []
        self.max_norm = 0.0
        self._approximate: faiss.Index | None = None

    @property
    def dimension(self) -> int:
        return self.index.d

    @property
    def size(self) -> int:
        return len(self.passage_ids)

    def add(self, passage_ids: Sequence[str], vectors: np.ndarray, texts: Sequence[str] | None = None) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(passage_ids), self.dimension):
            raise ValueError(f"expected {len(passage_ids)} passage vectors of dimension {self.dimension}, "
                             f"got shape {vectors.shape}")
        if texts is not None and len(texts) != len(passage_ids):
            raise ValueError(f"expected {len(passage_ids)} passage texts, got {len(texts)}")
        if self.size and (texts is not None) != (len(self.texts) == self.size):
            raise ValueError("ShardIndex.add: give texts with every batch of passages or with none")
        if not len(passage_ids):
            return
        self.index.add(vectors)
        self._approximate = None
        self.passage_ids.extend(passage_ids)
        if texts is not None:
            self.texts.extend(texts)
        self.max_norm = max(self.max_norm, float(np.linalg.norm(vectors, axis=1).max()))

    def vectors(self) -> np.ndarray:
        """The stored vectors, (size, dimension), read in place (no copy): valid until the next `add`."""
        if self.size == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        stored = faiss.rev_swig_ptr(self.index.get_xb(), self.size * self.dimension)
        return stored.reshape(self.size, self.dimension)

    def approximate_index(self) -> faiss.Index:
        """The approximate index of `settings` over the shard's vectors: built, trained on them and tuned once."""
        if self._approximate is None:
            factory = self.settings.factory
            vectors = self.vectors()
            try:
                index = faiss.index_factory(self.dimension, factory, faiss.METRIC_INNER_PRODUCT)
                if not index.is_trained:
                    index.train(vectors)
                index.add(vectors)
            except RuntimeError as error:
                reason = str(error).strip().splitlines()[-1]
                raise ValueError(f"mining index {factory!r} cannot be built over a shard of {self.size:,} passages of "
                                 f"dimension {self.dimension} ({reason}): use fewer lists, another index, or 'Flat' "
                                 "(exact)") from error
            parameters = faiss.ParameterSpace()
            if self.settings.nprobe is not None:
                parameters.set_index_parameter(index, "nprobe", self.settings.nprobe)
            if self.settings.ef_search is not None:
                parameters.set_index_parameter(index, "efSearch", self.settings.ef_search)
            self._approximate = index
        return self._approximate


def build_shard_index(passage_ids: Sequence[str], vectors: np.ndarray,
                      settings: IndexSettings = EXACT) -> ShardIndex:
    vectors = np.asarray(vectors, dtype=np.float32)
    shard = ShardIndex(vectors.shape[1], settings)
    shard.add(passage_ids, vectors)
    return shard


def search_shard_rows(shard: ShardIndex, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query within one shard, as shard rows and exact scores, both (queries, min(k, size)), hardest
    first, ties by passage_id. Exact unless the shard's settings name an approximate index; there a query may get
    fewer than k hits, and the rows it lacks are -1 (score -inf) at the end.

    faiss ranks in float32; the hits are then rescored exactly (`exact_scores`) and re-sorted. To be sure no passage
    faiss left out belongs in the exact top-k, the exact search fetches more than k and accepts the result only when the
    k-th exact score beats the last fetched faiss score by more than float32's error bound (d * eps * |q| * max|p|);
    otherwise that query is searched again with twice the fetch, up to the whole shard. Sorting is vectorized; only a
    query with two equal exact scores among its top k + 1 is re-sorted in Python, to break the tie by passage_id.
    """
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != shard.dimension:
        raise ValueError(f"query vectors have shape {queries.shape}, the shard index has dimension {shard.dimension}: "
                         "queries and passages must come from the same teacher at the same dimension")
    size = shard.size
    keep = min(k, size)
    found_rows = np.full((len(queries), keep), -1, dtype=np.int64)
    found_scores = np.full((len(queries), keep), -np.inf, dtype=np.float64)
    if keep == 0 or len(queries) == 0:
        return found_rows, found_scores
    stored = shard.vectors()
    fetch = min(size, k + _TIE_SLACK)
    if not shard.settings.exact:
        # One fetch, rescored: the approximate index's misses are its recall, not something a larger fetch settles.
        _, fetched = shard.approximate_index().search(queries, fetch)
        for start in range(0, len(queries), _RESCORE_BLOCK):
            block = slice(start, start + _RESCORE_BLOCK)
            found_rows[block], found_scores[block] = _rescored_top(shard, stored, queries[block], fetched[block], keep)
        return found_rows, found_scores
    # Bound on |faiss float32 score - exact score|: d * u * |q| * |p| with u = eps / 2; eps doubles it for safety.
    tolerance = queries.shape[1] * float(np.finfo(np.float32).eps) * np.linalg.norm(queries, axis=1) * shard.max_norm
    pending = np.arange(len(queries))
    while pending.size:
        faiss_scores, fetched = shard.index.search(queries[pending], fetch)
        unsettled: list[np.ndarray] = []
        for start in range(0, len(pending), _RESCORE_BLOCK):
            block = pending[start:start + _RESCORE_BLOCK]
            top_rows, top_scores = _rescored_top(shard, stored, queries[block], fetched[start:start + _RESCORE_BLOCK],
                                                 keep)
            settled = top_scores[:, -1] > faiss_scores[start:start + _RESCORE_BLOCK, -1] + tolerance[block]
            if fetch >= size:
                settled[:] = True
            found_rows[block[settled]] = top_rows[settled]
            found_scores[block[settled]] = top_scores[settled]
            unsettled.append(block[~settled])
        pending = np.concatenate(unsettled)
        fetch = min(size, fetch * 2)
    return found_rows, found_scores


def _rescored_top(shard: ShardIndex, stored: np.ndarray, queries: np.ndarray, fetched: np.ndarray,
                  keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The `keep` best of each query's fetched shard rows by exact score, ties by passage_id: (rows, scores). A
    fetched row of -1 (faiss found no more) scores -inf and stays -1."""
    found = fetched >= 0
    scores = exact_scores(queries[:, None, :], stored[np.where(found, fetched, 0)])
    scores[~found] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")
    head = np.take_along_axis(scores, order[:, :keep + 1], axis=1)
    ties = (head[:, 1:] == head[:, :-1]) & np.isfinite(head[:, 1:])
    for tied in np.flatnonzero(ties.any(axis=1)):
        row_scores, rows = scores[tied], fetched[tied]
        order[tied] = sorted(range(len(rows)), key=lambda j: (-row_scores[j], rows[j] < 0,
                                                               shard.passage_ids[rows[j]]))
    top = order[:, :keep]
    return np.take_along_axis(fetched, top, axis=1), np.take_along_axis(scores, top, axis=1)


def search_shard(shard: ShardIndex, query_vectors: np.ndarray, k: int) -> list[list[Hit]]:
    """Exact top-k of each query within one shard, hardest first, ties by passage_id (see `search_shard_rows`)."""
    rows, scores = search_shard_rows(shard, query_vectors, k)
    ids = shard.passage_ids
    return [
        [Hit(ids[row], score) for row, score in zip(query_rows, query_scores, strict=True) if row >= 0]
        for query_rows, query_scores in zip(rows.tolist(), scores.tolist(), strict=True)
    ]


def merge_topk(hit_lists: Iterable[Iterable[Hit]], k: int) -> list[Hit]:
    """The global top-k from per-shard top-k lists: a bounded heap, same order and tie-breaking as `search_shard`."""
    return heapq.nsmallest(k, (Hit(*hit) for hit in itertools.chain.from_iterable(hit_lists)), key=hit_order)


# --- Beam -------------------------------------------------------------------------------------------------------------

_PASSAGE_TAG = "p"
_TEXT_TAG = "t"
_QUERY_TAG = "q"
#: Spill file columns beside the id and vector: a passage's text, the positive passage_id a query asks the search for.
_TEXT, _LOOKUP = "text", "lookup"

#: A routed part of a spill file: (tag, path, batch indexes, low hash, high hash) of one (shard, query group).
SpillPart = tuple[str, str, list[int], int, int]


def _route_corpus(spilled: SpillFile, tag: str, plan: tuple[int, int]) -> Iterator[tuple[tuple[int, int], SpillPart]]:
    """A passage vector or text file goes, by the batches overlapping each shard's hash range, to that shard once per
    query group: ((shard, group), part)."""
    num_shards, query_groups = plan
    for shard in range(num_shards):
        low, high = hash_range(shard, num_shards)
        batches = spilled.batches_within(low, high)
        for group in range(query_groups if batches else 0):
            yield (shard, group), (tag, spilled.path, batches, low, high)


def _route_queries(spilled: SpillFile, plan: tuple[int, int]) -> Iterator[tuple[tuple[int, int], SpillPart]]:
    """A query file goes, by the batches overlapping each query group's hash range, to every shard of that group."""
    num_shards, query_groups = plan
    for group in range(query_groups):
        low, high = hash_range(group, query_groups)
        batches = spilled.batches_within(low, high)
        for shard in range(num_shards if batches else 0):
            yield (shard, group), (_QUERY_TAG, spilled.path, batches, low, high)


def _spilled_rows(spilled: SpillFile) -> int:
    return spilled.rows


class _SearchShardFn(beam.DoFn):
    """One (shard, query group): reads the shard's passages from their spill files into its index (with their texts,
    when the search has texts: a passage without one is left out), then searches the group's queries.

    Emits, per query, (query_id, (hits, positive_vector)): the shard's top-k as (passage_id, text, score, embedding)
    tuples, hardest first (text None when the search has no texts; embedding the float32 bytes with `keep_embeddings`,
    else None), and the vector of the query's positive when the query asked for it and the shard holds it (else None).
    Plain tuples, not Hit or Candidate: Beam codes them without pickling.
    """

    def __init__(self, k: int, query_batch_size: int, faiss_threads: int | None, keep_embeddings: bool = False,
                 stage: str = "search", index: IndexSettings = EXACT, with_texts: bool = False):
        self._k = k
        self._index = index
        self._query_batch_size = query_batch_size
        self._faiss_threads = faiss_threads
        self._keep_embeddings = keep_embeddings
        self._with_texts = with_texts
        self._searched = beam.metrics.Metrics.counter(f"embforge.{stage}", "shard_searches")

    def setup(self) -> None:
        if self._faiss_threads is not None:
            faiss.omp_set_num_threads(self._faiss_threads)

    def process(self, element: tuple[tuple[int, int], Iterable[SpillPart]]) -> Iterator[Any]:
        _, parts = element
        parts = sorted(parts)  # a GroupByKey gives no order; the index is built in the same order on every retry
        query_tables = [read_spilled(*part[1:]) for part in parts if part[0] == _QUERY_TAG]
        shard = self._build_shard(parts)
        if shard is None or not query_tables:
            return
        self._searched.inc()
        stored = shard.vectors()
        positive_rows = self._positive_rows(shard, query_tables)
        texts = shard.texts or None
        for table in query_tables:
            query_ids, lookups = table.column(ID).to_pylist(), table.column(_LOOKUP).to_pylist()
            queries = vector_matrix(table)
            if queries.shape[1] != shard.dimension:
                raise ValueError(f"query {query_ids[0]!r} has dimension {queries.shape[1]}, the passages "
                                 f"{shard.dimension}: embed queries and passages with the same teacher and dimension")
            for start in range(0, len(query_ids), self._query_batch_size):
                rows, scores = search_shard_rows(shard, queries[start:start + self._query_batch_size], self._k)
                for offset, (query_rows, query_scores) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True)):
                    hits = [
                        (shard.passage_ids[row], texts[row] if texts else None, score,
                         stored[row].tobytes() if self._keep_embeddings else None)
                        for row, score in zip(query_rows, query_scores, strict=True) if row >= 0
                    ]
                    positive_row = positive_rows.get(lookups[start + offset])
                    positive = None if positive_row is None else stored[positive_row].tobytes()
                    yield query_ids[start + offset], (hits, positive)

    def _build_shard(self, parts: list[SpillPart]) -> ShardIndex | None:
        texts: dict[str, str] | None = None
        if self._with_texts:
            texts = {}
            for part in parts:
                if part[0] == _TEXT_TAG:
                    table = read_spilled(*part[1:])
                    texts.update(zip(table.column(ID).to_pylist(), table.column(_TEXT).to_pylist(), strict=True))
        shard: ShardIndex | None = None
        for part in parts:
            if part[0] != _PASSAGE_TAG:
                continue
            table = read_spilled(*part[1:])
            passage_ids, vectors = table.column(ID).to_pylist(), vector_matrix(table)
            passage_texts = None
            if texts is not None:
                with_text = [row for row, passage_id in enumerate(passage_ids) if passage_id in texts]
                if len(with_text) < len(passage_ids):
                    passage_ids, vectors = [passage_ids[row] for row in with_text], vectors[with_text]
                passage_texts = [texts[passage_id] for passage_id in passage_ids]
            if shard is None:
                shard = ShardIndex(vectors.shape[1], self._index)
            shard.add(passage_ids, vectors, passage_texts)
        return shard if shard is not None and shard.size else None

    @staticmethod
    def _positive_rows(shard: ShardIndex, query_tables: list[pa.Table]) -> dict[str | None, int]:
        """Shard row of every positive a query of the group asked for and this shard holds."""
        wanted = {passage_id for table in query_tables for passage_id in table.column(_LOOKUP).to_pylist()
                  if passage_id is not None}
        if not wanted:
            return {}
        # passage_ids are unique by contract; a duplicate id resolves to its first copy in this shard.
        rows: dict[str | None, int] = {}
        for row, passage_id in enumerate(shard.passage_ids):
            if passage_id in wanted and passage_id not in rows:
                rows[passage_id] = row
        return rows


def merge_shard_hits(hit_lists: Sequence[list[ShardHit]], k: int) -> list[ShardHit]:
    """The global top-k of per-shard hits, ordered as `merge_topk` orders them."""
    if len(hit_lists) == 1:
        return hit_lists[0]
    return heapq.nsmallest(k, itertools.chain.from_iterable(hit_lists), key=lambda hit: (-hit[2], hit[0]))


class MergeShardResults(beam.CombineFn):
    """Per query: `_SearchShardFn`'s per-shard results (hits, positive vector or None) -> one (global top-k hits,
    positive vector or None).

    A combine, not a grouping, so the runner merges the shards' results where they are made (Beam lifts the combine
    into the search's bundles) and only k hits a query travel on: a query's hits from every shard, with texts and
    vectors, are num_shards times that.
    """

    def __init__(self, k: int):
        self._k = k

    def create_accumulator(self) -> tuple[list[ShardHit], bytes | None]:
        return [], None

    def add_input(self, accumulator: tuple[list[ShardHit], bytes | None],
                  shard_result: tuple[list[ShardHit], bytes | None]) -> tuple[list[ShardHit], bytes | None]:
        return self.merge_accumulators([accumulator, shard_result])

    def merge_accumulators(self, accumulators: Iterable[tuple[list[ShardHit], bytes | None]],
                           ) -> tuple[list[ShardHit], bytes | None]:
        accumulators = list(accumulators)
        hits = merge_shard_hits([hits for hits, _ in accumulators], self._k)
        return list(hits), next((vector for _, vector in accumulators if vector is not None), None)

    def extract_output(self, accumulator: tuple[list[ShardHit], bytes | None]) -> tuple[list[ShardHit], bytes | None]:
        return accumulator


class _TopHitsFn(beam.CombineFn):
    """Per query: the global top-k (as Hits) of the per-shard results of `_SearchShardFn`."""

    def __init__(self, k: int):
        self._k = k

    def create_accumulator(self) -> list[Hit]:
        return []

    def add_input(self, accumulator: list[Hit], shard_result: tuple[list[ShardHit], bytes | None]) -> list[Hit]:
        hits, _ = shard_result
        return merge_topk([accumulator, ((passage_id, score) for passage_id, _, score, _ in hits)], self._k)

    def merge_accumulators(self, accumulators: Iterable[list[Hit]]) -> list[Hit]:
        return merge_topk(accumulators, self._k)

    def extract_output(self, accumulator: list[Hit]) -> list[Hit]:
        return accumulator


def _bare_search_item(item: tuple[str, bytes | Sequence[float]]) -> tuple[str, bytes, None]:
    """An (id, vector) query as a search item that asks for no positive's vector."""
    item_id, vector = item
    return item_id, pack_vector(vector), None


class SearchShards(beam.PTransform):
    """{"queries": (query_id, vector bytes, positive passage_id | None), "passages": (passage_id, vector bytes),
    optionally "texts": (passage_id, text)} -> (query_id, (hits, positive_vector)), once per query and shard (see
    `_SearchShardFn`). Vectors are `pack_vector` bytes.

    Spills passages, texts and queries to files (pipelines/search_spill.py), counts the corpus from the files for
    `num_shards`, routes the files' batches to their (shard, query group) pairs, pairs every shard with every query
    group in one GroupByKey of file parts, and searches each pair; the spill folder is deleted once every pair is
    searched. With "texts", passages and their texts are joined inside each shard (a passage without a text is left
    out) and hits carry their texts. Merging the per-shard results is left to the caller: MineNegatives keeps texts,
    vectors and the positive's vector (`MergeShardResults`), ShardedTopK scores only. `stage` names the Beam metrics
    namespace of the searches (`embforge.<stage>`, counter `shard_searches`); `index` the faiss index each shard
    searches (exact by default); `spill_root` where the spill folder goes (None: the pipeline's temp_location, else
    the machine's temporary directory).
    """

    def __init__(self, k: int, shard_size: int | None, query_groups: int | None, query_batch_size: int,
                 faiss_threads: int | None, *, keep_embeddings: bool = False, stage: str = "search",
                 index: IndexSettings = EXACT, spill_root: str | None = None):
        super().__init__()
        self._stage = stage
        self._index = index
        self._k = k
        self._shard_size = shard_size
        self._query_groups = query_groups
        self._query_batch_size = query_batch_size
        self._faiss_threads = faiss_threads
        self._keep_embeddings = keep_embeddings
        self._spill_root = spill_root

    def expand(self, inputs: Mapping[str, beam.PCollection]) -> beam.PCollection:
        pipeline = inputs["queries"].pipeline
        folder = spill_folder(pipeline, self._spill_root)
        passage_files = inputs["passages"] | "SpillPassages" >> beam.ParDo(
            SpillFn(folder, "passage", SHARD_SALT, (VECTOR,)))
        query_files = inputs["queries"] | "SpillQueries" >> beam.ParDo(
            SpillFn(folder, "query", QUERY_GROUP_SALT, (VECTOR, _LOOKUP)))
        query_count = beam.pvalue.AsSingleton(
            query_files | "QueryRows" >> beam.Map(_spilled_rows) | "CountQueries" >> beam.CombineGlobally(sum))
        plan = beam.pvalue.AsSingleton(
            passage_files
            | "PassageRows" >> beam.Map(_spilled_rows)
            | "CountPassages" >> beam.CombineGlobally(sum)
            | "Plan" >> beam.Map(lambda passages, queries, shard_size, groups, approximate: search_plan(
                passages, queries, shard_size, groups, approximate), query_count, self._shard_size,
                self._query_groups, not self._index.exact)
        )
        routed = [
            passage_files | "RoutePassages" >> beam.FlatMap(_route_corpus, _PASSAGE_TAG, plan),
            query_files | "RouteQueries" >> beam.FlatMap(_route_queries, plan),
        ]
        if "texts" in inputs:
            text_files = inputs["texts"] | "SpillTexts" >> beam.ParDo(SpillFn(folder, "text", SHARD_SALT, (_TEXT,)))
            routed.append(text_files | "RouteTexts" >> beam.FlatMap(_route_corpus, _TEXT_TAG, plan))
        results = (
            tuple(routed)
            | "UnionForSearch" >> beam.Flatten()
            | "GroupByShardAndQueryGroup" >> beam.GroupByKey()
            | "SearchShards" >> beam.ParDo(_SearchShardFn(
                self._k, self._query_batch_size, self._faiss_threads, self._keep_embeddings, self._stage, self._index,
                with_texts="texts" in inputs))
        )
        # The count is a side input only so that the deletion waits until every (shard, group) has read its files.
        searched = beam.pvalue.AsSingleton(results | "CountResults" >> beam.combiners.Count.Globally())
        _ = (pipeline | "SpillFolder" >> beam.Create([folder])
             | "RemoveSpillFiles" >> beam.Map(remove_spill_folder, searched))
        return results


class ShardedTopK(beam.PTransform):
    """{"queries": (query_id, vector), "passages": (passage_id, vector)} -> (query_id, [Hit(passage_id, score)]).

    Exact inner-product top-k over a corpus sharded into `ceil(size / shard_size)` shards (None: `search_plan`
    chooses from the corpus and query counts), hardest first, ties by passage_id: the result does not depend on
    `shard_size` or `query_groups` (see the module docstring for how the shards and query groups are paired, and the
    tradeoffs). Vectors are float lists, numpy arrays or `pack_vector` bytes. A query with no passage at all gets no
    output row. `spill_root`: see `SearchShards`. The round-trip relevance check uses it; MineNegatives runs the same
    search and merges the shards' results in its join with the query rows instead.
    """

    def __init__(
        self,
        k: int,
        shard_size: int | None = None,
        *,
        query_groups: int | None = None,
        query_batch_size: int = DEFAULT_QUERY_BATCH_SIZE,
        faiss_threads: int | None = None,
        stage: str = "search",
        spill_root: str | None = None,
    ):
        super().__init__()
        optional = (shard_size, query_groups)
        if k < 1 or query_batch_size < 1 or any(value is not None and value < 1 for value in optional):
            raise ValueError(f"ShardedTopK: k, shard_size, query_groups and query_batch_size must be >= 1, got "
                             f"{k}, {shard_size}, {query_groups}, {query_batch_size}")
        self._k = k
        self._search = SearchShards(k, shard_size, query_groups, query_batch_size, faiss_threads, stage=stage,
                                    spill_root=spill_root)

    def expand(self, inputs: Mapping[str, beam.PCollection]) -> beam.PCollection:
        items = {
            "queries": inputs["queries"] | "QueryItems" >> beam.Map(_bare_search_item),
            "passages": inputs["passages"] | "PassageItems" >> beam.MapTuple(
                lambda passage_id, vector: (passage_id, pack_vector(vector))),
        }
        return items | "Search" >> self._search | "MergeTopK" >> beam.CombinePerKey(_TopHitsFn(self._k))

