"""The layout of a run directory, and reading it back, on any Beam filesystem.

    <run>/<kind>/part-SSSSS-of-NNNNN.parquet   one folder per record kind (data_schemas.SCHEMAS names them)
    <run>/manifest.json                        the per-stage balance, models, versions, counts
    <run>/train_split/, <run>/holdout_eval/    what `embforge run` trains on and evaluates on (pipelines/holdout.py)
    <run>/student/, <run>/report/              the trained student and its evaluation (`embforge run`)
    <run>/embforge.log                         every log line of the commands run on it (pipelines/logs.py)

`embforge generate` writes it through Beam's `FileSystems` (local, gs://, ...), so everything that reads it does too.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from data_schemas import SchemaError, validate_table

MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "part"
#: Record kinds a generate run writes, each a folder of shards.
OUTPUT_KINDS = ("triplets", "pairs", "passages", "classification", "rejected")


def parquet_files(folder: str) -> list[str]:
    """`<folder>/*.parquet`, sorted: a record kind's shards, or a cache's files. Names starting with "." are
    temporary or tool files (a write in progress, a sync tool's), never data."""
    pattern = posixpath.join(folder, "*.parquet")
    return sorted(meta.path for meta in FileSystems.match([pattern])[0].metadata_list
                  if not posixpath.basename(meta.path).startswith("."))


def shard_paths(run_dir: str, kind: str) -> list[str]:
    """The shards of one record kind: `<run_dir>/<kind>/*.parquet` (see `parquet_files`)."""
    return parquet_files(posixpath.join(run_dir, kind))


def shard_rows(path: str) -> int:
    """Rows of a shard from its Parquet footer, without reading the data (a shard may be gigabytes); 0 for an empty
    shard, with or without columns."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        source = handle if handle.seekable() else pa.BufferReader(handle.read())
        return pq.ParquetFile(source).metadata.num_rows


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (a shard or a cache file), all its columns or `columns`, unvalidated; an unreadable file, or one
    without a requested column, is a SchemaError naming it."""
    try:
        # Uncompressed: a shard is zstd inside Parquet, never gzip around it. The whole file is read into memory:
        # some Beam file objects cannot seek, and Parquet's footer is at the end.
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return pq.read_table(pa.BufferReader(handle.read()), columns=columns)
    except (pa.ArrowInvalid, OSError, KeyError) as error:
        raise SchemaError(f"not a readable Parquet file: {error}", source=path) from error


def read_shard(path: str, schema: pa.Schema) -> pa.Table:
    """One shard (or cache file), validated against `schema` (errors name the file, row and column). A shard without
    any column is an empty shard (Beam's sharding can leave one) and reads as an empty table of `schema`; an empty
    shard with columns must still match, so a shard of another schema version is refused even without rows."""
    table = read_parquet(path)
    if table.num_rows == 0 and table.num_columns == 0:
        return schema.empty_table()
    return validate_table(table, schema, source=path)


def read_kind(run_dir: str, kind: str, schema: pa.Schema) -> pa.Table:
    """Every row of one record kind, validated; an empty table when the run has none."""
    tables = [read_shard(path, schema) for path in shard_paths(run_dir, kind)]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def write_table(table: pa.Table, path: str) -> None:
    """One zstd Parquet file at `path`, on any Beam filesystem."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    with FileSystems.create(path) as handle:
        handle.write(sink.getvalue().to_pybytes())
