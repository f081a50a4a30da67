"""Spill files of the sharded search (pipelines/sharded_search.py): the corpus and the queries on disk, so that the
search's shuffle moves file descriptors, not vectors.

Why a separate path for the data: Beam's in-process runners keep every GroupByKey's input in memory, and Dataflow
writes it through its shuffle service. Sent through the search's (shard, query group) grouping, the corpus's vectors
were held once per query group, after a join that had already held them to pair each passage with its vector: 1M x
384-d passages peaked at 11.9 GB on one machine (benchmarks/RESULTS.md). Here each bundle of passage vectors, passage
texts or query vectors is written once, as an Arrow IPC file under the search's spill folder (a Beam filesystem path:
local, or the pipeline's `temp_location`, gs:// on Dataflow), and only a `SpillFile` (its path and the hash range of
each of its record batches) goes through the shuffle. Each (shard, query group) reads the batches that overlap its
hash range, so a worker holds one shard and one query group, never the corpus.

Routing by hash range: every row carries a 62-bit stable hash of its id (`routing_hash`); part p of P holds the hashes
in `hash_range(p, P)`. Rows are sorted by hash inside a file, so a part reads the batches overlapping its range (about
1/P of each file), and a file can be written before the corpus is counted: the number of shards is chosen afterwards,
from the files' row counts, without another pass over the vectors.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils.windowed_value import WindowedValue

from pipelines.text_matching import stable_hash

#: Size of the hash space that `hash_range` divides: 62 bits, so that every hash and every range bound, the last
#: part's end (HASH_SPACE itself) included, fits a signed 64-bit integer. Beam codes the ints of typed elements
#: (`SpillFile`, the routed parts) with VarIntCoder, which raises OverflowError for 2**63 and above (apache-beam
#: 2.78.0 fails every search with the full 64-bit space).
HASH_SPACE = 1 << 62
#: Rows per record batch: the unit a part reads. 4,096 x 768 float32 is 12 MB; a part reads at most one batch beyond
#: its range at each end of a file.
SPILL_BATCH_ROWS = 4096
#: A spilling DoFn writes its buffer out once it holds this many bytes of vectors and texts (and at the end of its
#: bundle): what one spilling worker holds, whatever the corpus size.
SPILL_FILE_BYTES = 64 << 20
#: Column names of a spill file; `vector` is fixed-size binary (float32 bytes), the others strings.
HASH, ID, VECTOR = "hash", "id", "vector"
#: Salts of `routing_hash`: passages are routed to shards, queries to query groups.
SHARD_SALT, QUERY_GROUP_SALT = "shard", "query-group"


def routing_hash(salt: str, item_id: str) -> int:
    """The top 62 bits of the 64-bit `stable_hash`: a place in [0, HASH_SPACE)."""
    return stable_hash(salt, item_id) >> 2


def hash_range(part: int, parts: int) -> tuple[int, int]:
    """[low, high) of the hashes part `part` of `parts` holds: equal slices of the hash space."""
    return part * HASH_SPACE // parts, (part + 1) * HASH_SPACE // parts


def part_of(hash_value: int, parts: int) -> int:
    """The part whose `hash_range` holds `hash_value`."""
    return hash_value * parts // HASH_SPACE


class SpillFile(NamedTuple):
    """A written spill file: its path and, per record batch, (first hash, last hash, rows), in hash order."""

    path: str
    batches: tuple[tuple[int, int, int], ...]

    @property
    def rows(self) -> int:
        return sum(rows for _, _, rows in self.batches)

    def batches_within(self, low: int, high: int) -> list[int]:
        """Indexes of the batches holding any hash in [low, high)."""
        return [index for index, (first, last, _) in enumerate(self.batches) if first < high and last >= low]


def spill_folder(pipeline: beam.Pipeline, configured: str | None) -> str:
    """A fresh folder for one search's spill files: under `configured`, else the pipeline's `temp_location` (where
    Dataflow workers can all read), else the machine's temporary directory (the local runners' workers share it)."""
    import tempfile

    from apache_beam.options.pipeline_options import GoogleCloudOptions

    root = configured or pipeline.options.view_as(GoogleCloudOptions).temp_location or tempfile.gettempdir()
    return FileSystems.join(root, f"embforge-search-{uuid.uuid4().hex}")


def remove_spill_folder(folder: str, _searched: Any = None) -> None:
    """Deletes a search's spill files; `_searched` is the side input that makes the step wait for the search."""
    if FileSystems.exists(folder):
        FileSystems.delete([folder])


class SpillFn(beam.DoFn):
    """Items (id, vector) or (id, vector, text-or-None) or (id, text) -> `SpillFile`s, one per ~`SPILL_FILE_BYTES`
    of each bundle and window.

    `columns` names what follows the id in each item: "vector" (float32 bytes, `sharded_search.pack_vector`) and
    string columns (passage texts, the positive passage_id a query asks for). `kind` ("passage", "query") names the
    rows in errors; `salt` is the `routing_hash` salt the rows are sorted by.
    """

    def __init__(self, folder: str, kind: str, salt: str, columns: Sequence[str]):
        self._folder = folder
        self._kind = kind
        self._salt = salt
        self._columns = tuple(columns)

    def start_bundle(self) -> None:
        self._buffers: dict[Any, list[tuple[Any, ...]]] = {}
        self._sizes: dict[Any, int] = {}

    def process(self, item: tuple[Any, ...], window: Any = beam.DoFn.WindowParam) -> Iterator[SpillFile]:
        buffer = self._buffers.get(window)
        if buffer is None:
            buffer = self._buffers[window] = []
            self._sizes[window] = 0
        buffer.append(item)
        # Bytes of the row (ids and texts by characters): near enough to bound the buffer.
        self._sizes[window] += sum(len(value) for value in item if value is not None)
        if self._sizes[window] >= SPILL_FILE_BYTES:
            del self._buffers[window], self._sizes[window]
            yield self._write(buffer)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for window, buffer in self._buffers.items():
            if buffer:
                yield WindowedValue(self._write(buffer), window.max_timestamp(), (window,))
        self._buffers, self._sizes = {}, {}

    def _write(self, items: list[tuple[Any, ...]]) -> SpillFile:
        ids = [item[0] for item in items]
        hashes = np.fromiter((routing_hash(self._salt, item_id) for item_id in ids), dtype=np.uint64, count=len(ids))
        order = np.argsort(hashes, kind="stable")
        hashes = hashes[order]
        columns: dict[str, pa.Array] = {HASH: pa.array(hashes), ID: pa.array([ids[row] for row in order], pa.string())}
        for position, name in enumerate(self._columns, start=1):
            values = [item[position] for item in items]
            if name == VECTOR:
                width = _common_width(ids, values, self._kind)
                columns[name] = pa.array([values[row] for row in order], pa.binary(width))
            else:
                columns[name] = pa.array([values[row] for row in order], pa.string())
        table = pa.table(columns)
        path = FileSystems.join(self._folder, f"{self._kind}-{uuid.uuid4().hex}.arrow")
        batches = []
        with FileSystems.create(path, mime_type="application/vnd.apache.arrow.file",
                                compression_type=CompressionTypes.UNCOMPRESSED) as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=SPILL_BATCH_ROWS):
                    writer.write_batch(batch)
                    batch_hashes = batch.column(HASH)
                    batches.append((batch_hashes[0].as_py(), batch_hashes[-1].as_py(), batch.num_rows))
        return SpillFile(path, tuple(batches))


def _common_width(ids: list[str], vectors: list[bytes], kind: str) -> int:
    """The byte width every vector of the file shares; two widths name an odd row and the first row."""
    widths = [len(vector) for vector in vectors]
    other = next((row for row, width in enumerate(widths) if width != widths[0]), None)
    if other is not None:
        raise ValueError(f"{kind} {ids[other]!r} has dimension {widths[other] // 4}, {kind} {ids[0]!r} "
                         f"{widths[0] // 4}: embed queries and passages with the same teacher and dimension")
    return widths[0]


def read_spilled(path: str, batches: Sequence[int], low: int, high: int) -> pa.Table:
    """The rows of `batches` of a spill file whose hash lies in [low, high), in hash order."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as source:
        reader = pa.ipc.open_file(source)
        tables = [pa.Table.from_batches([reader.get_batch(index)]) for index in batches]
    table = pa.concat_tables(tables) if tables else reader.schema.empty_table()
    hashes = table.column(HASH).to_numpy()
    start, stop = (int(np.searchsorted(hashes, np.uint64(bound))) for bound in (low, high))
    return table.slice(start, stop - start)


def vector_matrix(table: pa.Table) -> np.ndarray:
    """A spill table's vectors as a (rows, dimension) float32 array."""
    column = table.column(VECTOR).combine_chunks()
    width = column.type.byte_width
    if len(column) == 0:
        return np.zeros((0, width // 4), dtype=np.float32)
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8)[column.offset * width:(column.offset + len(column))
                                                                * width]
    return data.view(np.float32).reshape(len(column), width // 4)
