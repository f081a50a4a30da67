"""The content-addressed cache for LLM answers and teacher embeddings ("pay once").

Layout under a cache directory (local path or `gs://`, all I/O through Beam filesystems):

    <cache_dir>/llm/<uuid>.parquet         rows of data_schemas.LLM_CACHE_ENTRY
    <cache_dir>/embeddings/<uuid>.parquet  rows of data_schemas.EMBEDDING_CACHE_ENTRY

The cache is append-only: writers add new files, never rewrite old ones, so concurrent workers and concurrent runs
cannot corrupt it. Inside a pipeline the existing entries are read as a PCollection and joined with the requests by
key (CoGroupByKey), which works the same on DirectRunner and Dataflow and needs no worker to hold the whole cache.
New entries are flushed every few rows, written under a temporary name and renamed, so a killed run keeps every call it
paid for and never leaves a half-written file. Failures are never cached.
"""

from __future__ import annotations

import io
import logging
import posixpath
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
from pipelines.run_layout import parquet_files, read_shard

LOGGER = logging.getLogger(__name__)

LLM_CACHE = "llm"
EMBEDDING_CACHE = "embeddings"
_SCHEMAS = {LLM_CACHE: LLM_CACHE_ENTRY, EMBEDDING_CACHE: EMBEDDING_CACHE_ENTRY}


def cache_files(cache_dir: str, kind: str) -> list[str]:
    """Completed cache files of `kind`, listed as a run's shards are (temporary files of a run in progress or a killed
    run start with "." and are skipped)."""
    return parquet_files(posixpath.join(cache_dir, kind))


def read_cache_file(path: str, kind: str) -> pa.Table:
    return read_shard(path, _SCHEMAS[kind])


def write_cache_file(cache_dir: str, kind: str, rows: list[dict[str, Any]]) -> str:
    """Write `rows` as one new cache file, atomically (temporary name, then rename)."""
    table = validate_table(pa.Table.from_pylist(rows, schema=_SCHEMAS[kind]), _SCHEMAS[kind], source=f"{kind} cache")
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    folder = posixpath.join(cache_dir, kind)
    ensure_folder(folder)
    name = uuid.uuid4().hex
    temporary = posixpath.join(folder, f".{name}.tmp")
    final = posixpath.join(folder, f"{name}.parquet")
    with FileSystems.create(temporary) as handle:
        handle.write(buffer.getvalue())
    FileSystems.rename([temporary], [final])
    return final


class _ReadCacheFileFn(beam.DoFn):
    def __init__(self, kind: str):
        self._kind = kind

    def process(self, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for row in read_cache_file(path, self._kind).to_pylist():
            yield row["key"], row


class ReadCache(beam.PTransform):
    """Root transform: every cache entry of `kind` as (key, row). Files are listed once, at construction."""

    def __init__(self, cache_dir: str | None, kind: str):
        super().__init__()
        self._files = cache_files(cache_dir, kind) if cache_dir else []
        self._kind = kind

    def expand(self, pipeline):
        return (
            pipeline
            | "ListFiles" >> beam.Create(self._files)
            # Spread files over workers before reading them.
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadCacheFileFn(self._kind))
        )


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


class _SplitByCacheFn(beam.DoFn):
    MISSES = "misses"

    def process(self, element):
        key, grouped = element
        # A key with entries but no items is an entry this run does not need: it yields nothing.
        items = list(grouped["items"])
        entries = list(grouped["entries"])
        if items and entries:
            yield items, entries[0]
        elif items:
            yield beam.pvalue.TaggedOutput(self.MISSES, (key, items))


class SplitByCache(beam.PTransform):
    """(key, item) -> {"hits": (items, cache entry), "misses": (key, items)}, items grouped by their key.

    Grouping by key is what makes identical requests of one run share one call. `read_label` names the cache-reading
    root transform, which must be unique in the pipeline.
    """

    def __init__(self, cache_dir: str | None, kind: str, read_label: str):
        super().__init__()
        self._cache_dir = cache_dir
        self._kind = kind
        self._read_label = read_label

    def expand(self, keyed_items):
        entries = keyed_items.pipeline | self._read_label >> ReadCache(self._cache_dir, self._kind)
        split = (
            {"items": keyed_items, "entries": entries}
            | "Join" >> beam.CoGroupByKey()
            | "Split" >> beam.ParDo(_SplitByCacheFn()).with_outputs(_SplitByCacheFn.MISSES, main="hits")
        )
        return {"hits": split["hits"], "misses": split[_SplitByCacheFn.MISSES]}
