"""The content-addressed cache for LLM answers and teacher embeddings ("pay once").

Layout under a cache directory (local path or `gs://`, all I/O through Beam filesystems), one folder per partition:

    <cache_dir>/llm/<prompt>@<prompt version>/<model>/<uuid>.parquet   rows of data_schemas.LLM_CACHE_ENTRY
    <cache_dir>/embeddings/<model>/<task type>/<uuid>.parquet          rows of data_schemas.EMBEDDING_CACHE_ENTRY

A partition holds exactly the entries one kind of request can hit: an entry's key covers its prompt, prompt version
and model (or model and task type), so a request can only ever match an entry of its own partition. A stage therefore
reads only the partitions its requests fall in, and a re-run costs what the run needs, not what the cache has gathered
over its history (other prompts, other models, earlier prompt versions). Inside a partition other corpora's entries
remain; for them only the key column is read (see `SplitByCache`). Folder names are the names made safe for any
filesystem (`_folder_name`), each with a short hash of the exact values, so two names that read alike never share one.

The cache is append-only: writers add new files, never rewrite old ones, so concurrent workers and concurrent runs
cannot corrupt it. Inside a pipeline the existing entries are read as a PCollection and joined with the requests by
key (CoGroupByKey), which works the same on DirectRunner and Dataflow and needs no worker to hold the whole cache.
New entries are flushed every few rows, written under a temporary name and renamed, so a killed run keeps every call it
paid for and never leaves a half-written file. Failures are never cached.

Caches written before partitions existed have their files directly in `llm/` and `embeddings/`; `migrate_flat_files`
moves their entries into partitions once, at the start of a run (`pipelines/run.py`).
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import posixpath
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from data_schemas import EMBEDDING_CACHE_ENTRY, LLM_CACHE_ENTRY, validate_table
from pipelines.outputs import ensure_folder
from pipelines.run_layout import parquet_files, read_parquet, read_shard
from pipelines.sharded_search import pack_vector_column

LOGGER = logging.getLogger(__name__)

LLM_CACHE = "llm"
EMBEDDING_CACHE = "embeddings"
_SCHEMAS = {LLM_CACHE: LLM_CACHE_ENTRY, EMBEDDING_CACHE: EMBEDDING_CACHE_ENTRY}
#: Longest readable part of a partition folder name; the hash after it keeps long names apart.
_NAME_CHARS = 60


def _folder_name(readable: str, *exact: str) -> str:
    """`readable` made safe as one folder name on any filesystem, plus 10 hex digits of a hash of `exact`: names that
    differ only in characters replaced here (or beyond the cut) still get folders of their own."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", readable)[:_NAME_CHARS]
    digest = hashlib.sha256("\0".join(exact).encode()).hexdigest()[:10]
    return f"{safe}-{digest}"


def _model_folder(model_id: str, model_version: str) -> str:
    return _folder_name(model_id, model_id, model_version)


def llm_partition(model_id: str, model_version: str, prompt_name: str, prompt_version: str) -> str:
    """The folder (relative to `<cache_dir>/llm`) of the answers of one model to one prompt version."""
    prompt = f"{prompt_name}@{prompt_version}"
    return posixpath.join(_folder_name(prompt, prompt_name, prompt_version), _model_folder(model_id, model_version))


def embedding_partition(model_id: str, model_version: str, task_type: str) -> str:
    """The folder (relative to `<cache_dir>/embeddings`) of one model's embeddings for one task type."""
    return posixpath.join(_model_folder(model_id, model_version), _folder_name(task_type, task_type))


def entry_partition(kind: str, entry: dict[str, Any]) -> str:
    """The partition a cache entry is stored in, from the fields its key covers."""
    if kind == LLM_CACHE:
        return llm_partition(entry["model_id"], entry["model_version"], entry["prompt_name"], entry["prompt_version"])
    return embedding_partition(entry["model_id"], entry["model_version"], entry["task_type"])


def cache_files(cache_dir: str, kind: str) -> list[str]:
    """Completed cache files of `kind`, in every partition, listed as a run's shards are (temporary files of a run in
    progress or a killed run start with "." and are skipped)."""
    return parquet_files(posixpath.join(cache_dir, kind, "*", "*"))


def partition_files(cache_dir: str, kind: str, partition: str) -> list[str]:
    """Completed cache files of one partition."""
    return parquet_files(posixpath.join(cache_dir, kind, partition))


def read_cache_file(path: str, kind: str) -> pa.Table:
    return read_shard(path, _SCHEMAS[kind])


def read_cache_keys(path: str) -> list[str]:
    """The keys of one cache file, in row order, without decoding the answers or vectors."""
    return read_parquet(path, ["key"]).column("key").to_pylist()


def _write_partition_file(folder: str, rows: list[dict[str, Any]], schema: pa.Schema, source: str) -> str:
    table = validate_table(pa.Table.from_pylist(rows, schema=schema), schema, source=source)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    ensure_folder(folder)
    name = uuid.uuid4().hex
    temporary = posixpath.join(folder, f".{name}.tmp")
    final = posixpath.join(folder, f"{name}.parquet")
    with FileSystems.create(temporary) as handle:
        handle.write(buffer.getvalue())
    FileSystems.rename([temporary], [final])
    return final


def write_cache_file(cache_dir: str, kind: str, rows: list[dict[str, Any]]) -> list[str]:
    """Write `rows` as one new file in each partition they fall in, each atomically (temporary name, then rename);
    returns the files written."""
    by_partition: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        by_partition[entry_partition(kind, row)].append(row)
    return [_write_partition_file(posixpath.join(cache_dir, kind, partition), partition_rows, _SCHEMAS[kind],
                                  f"{kind} cache")
            for partition, partition_rows in sorted(by_partition.items())]


def migrate_flat_files(cache_dir: str) -> dict[str, int]:
    """Moves the entries of a cache written before partitions existed (files directly in `llm/`, `embeddings/`) into
    their partitions; returns how many files and entries moved (zero once done).

    Each old file is deleted only after all its entries are written to their partitions, so a kill at any point loses
    nothing: at worst an entry is in both places, and a rerun moves the file again (duplicate entries of one key are
    identical answers; a lookup takes either). A file that disappears meanwhile was moved by a concurrent run.
    """
    moved = {"files": 0, "entries": 0}
    for kind in (LLM_CACHE, EMBEDDING_CACHE):
        for path in parquet_files(posixpath.join(cache_dir, kind)):
            if not FileSystems.exists(path):
                continue
            rows = read_cache_file(path, kind).to_pylist()
            write_cache_file(cache_dir, kind, rows)
            try:
                FileSystems.delete([path])
            except OSError:
                if FileSystems.exists(path):
                    raise
            moved["files"] += 1
            moved["entries"] += len(rows)
    if moved["files"]:
        LOGGER.info("cache %s: moved %d entries from %d files of the old flat layout into partitions", cache_dir,
                    moved["entries"], moved["files"])
    return moved


class CacheWriter:
    """Buffers new entries inside a DoFn and flushes them to a new cache file every `flush_every` rows, or once the
    oldest buffered entry is `flush_seconds` old.

    Small flushes cost a few more files but bound what a kill can lose: `flush_every` answers, or the answers of the
    last `flush_seconds` when they come slowly (a batch of paid API answers must not wait for a bundle's end).
    """

    def __init__(self, cache_dir: str | None, kind: str, flush_every: int = 16, flush_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self._cache_dir = cache_dir
        self._kind = kind
        self._flush_every = flush_every
        self._flush_seconds = flush_seconds
        self._clock = clock
        self._pending: list[dict[str, Any]] = []
        self._oldest = 0.0

    def add(self, row: dict[str, Any]) -> None:
        if self._cache_dir is None:
            return
        if not self._pending:
            self._oldest = self._clock()
        self._pending.append(row)
        if len(self._pending) >= self._flush_every:
            self.flush()
        else:
            self.flush_if_due()

    def flush_if_due(self) -> None:
        """Flush when the oldest buffered entry has waited `flush_seconds`: callers waiting on slow answers call it
        while they wait, so an entry never sits unwritten for long."""
        if self._pending and self._clock() - self._oldest >= self._flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._pending and self._cache_dir is not None:
            write_cache_file(self._cache_dir, self._kind, self._pending)
            self._pending = []


class _ReadKeysFn(beam.DoFn):
    def process(self, path: str) -> Iterator[tuple[str, tuple[str, int]]]:
        for row, key in enumerate(read_cache_keys(path)):
            yield key, (path, row)


class _SplitByCacheFn(beam.DoFn):
    MISSES = "misses"

    # Annotated: Beam would infer the main and tagged outputs' union from the body and refuse the hits' GroupByKey.
    def process(self, element) -> Iterator[Any]:
        key, grouped = element
        # A key with entries but no items is an entry this run does not need: it yields nothing.
        items = list(grouped["items"])
        if not items:
            return
        locations = list(grouped["entries"])
        if locations:
            path, row = locations[0]
            yield path, (row, items)
        else:
            yield beam.pvalue.TaggedOutput(self.MISSES, (key, items))


class _FetchEntriesFn(beam.DoFn):
    """(path, [(row, items)]) -> (items, the entry at that row): each file with hits read once. Vectors (an embedding
    entry's `embedding`) come out as float32 bytes."""

    def __init__(self, kind: str):
        self._kind = kind

    def process(self, element) -> Iterator[tuple[list[Any], dict[str, Any]]]:
        path, hits = element
        hits = list(hits)
        table = read_cache_file(path, self._kind).take([row for row, _ in hits])
        if self._kind == EMBEDDING_CACHE:
            vectors = pack_vector_column(table.column("embedding"))
            table = table.drop_columns(["embedding"])
            entries = [{**entry, "embedding": vector} for entry, vector in zip(table.to_pylist(), vectors, strict=True)]
        else:
            entries = table.to_pylist()
        for (_, items), entry in zip(hits, entries, strict=True):
            yield items, entry


class SplitByCache(beam.PTransform):
    """(key, item) -> {"hits": (items, cache entry), "misses": (key, items)}, items grouped by their key.

    Grouping by key is what makes identical requests of one run share one call. The cache is read where the items
    can hit it: `partition_of(item)` names each item's partition, and only the files of those partitions are listed
    (when the pipeline runs, after the items are known). The join carries keys and file locations only; the entries
    themselves are read for the hits, each file once. `label` prefixes the transforms reading the cache, which must
    be unique in the pipeline.
    """

    def __init__(self, cache_dir: str | None, kind: str, partition_of: Callable[[Any], str], label: str):
        super().__init__()
        self._cache_dir = cache_dir
        self._kind = kind
        self._partition_of = partition_of
        self._label = label

    def expand(self, keyed_items):
        cache_dir, kind, partition_of = self._cache_dir, self._kind, self._partition_of
        if cache_dir:
            locations = (
                keyed_items
                | f"{self._label}.Partitions" >> beam.MapTuple(lambda _key, item: partition_of(item))
                | f"{self._label}.DistinctPartitions" >> beam.Distinct()
                | f"{self._label}.ListFiles" >> beam.FlatMap(lambda partition: partition_files(cache_dir, kind,
                                                                                               partition))
                # Spread files over workers before reading them.
                | f"{self._label}.Spread" >> beam.Reshuffle()
                | f"{self._label}.ReadKeys" >> beam.ParDo(_ReadKeysFn())
            )
        else:
            locations = keyed_items.pipeline | f"{self._label}.NoCache" >> beam.Create([])
        split = (
            {"items": keyed_items, "entries": locations}
            | "Join" >> beam.CoGroupByKey()
            | "Split" >> beam.ParDo(_SplitByCacheFn()).with_outputs(_SplitByCacheFn.MISSES, main="hits")
        )
        hits = (
            split["hits"]
            | "HitsByFile" >> beam.GroupByKey()
            | "FetchEntries" >> beam.ParDo(_FetchEntriesFn(kind))
        )
        return {"hits": hits, "misses": split[_SplitByCacheFn.MISSES]}
