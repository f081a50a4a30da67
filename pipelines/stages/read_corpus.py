"""Stage 1, ReadCorpus: a corpus on disk (or `gs://`) -> PASSAGE rows, one per unique passage id.

Input: `ReadCorpusConfig.path`, a file, a folder or a glob, in one of these formats (auto-detected from file names as
corpus_files.py describes, or set `format`):
- `jsonl`: one JSON object per line (`.jsonl`, `.ndjson`, `.json`, optionally `.gz` / `.bz2` / `.zst` ...), fields
  `id_field`, `text_field`, `title_field`. Read line by line: a big file never sits whole in a worker's memory.
- `beir`: a BEIR `corpus.jsonl` (`_id`, `title`, `text`); a BEIR folder reads only its `corpus.jsonl`.
- `parquet`: same fields as JSONL, read one batch of rows at a time.
- `save_to_disk`: a folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`), read with
  `datasets.load_from_disk`. Local folders only: the Arrow files are memory-mapped, which Beam filesystems cannot do.
- `text`: `.txt` / `.md` files, each split into passages (document_splitting.py); id `<relative path>#<index>`, title
  the document's first heading or its file stem. A document is read whole: it is one document, not a corpus.
- `builtin:python-stdlib`: the offline default corpus (`pipelines.stdlib_corpus`), built by the worker that reads it
  from its own Python's docstrings: nothing to ship in the pipeline graph, and no launcher temp file that Dataflow
  workers could not see (workers run the launcher's Python version, so they build the same corpus).

Output (`expand` returns a dict):
- `kept`: PASSAGE rows (`source` = `path:line` for JSONL and text, 1-based as in an editor; `path:row` for Parquet and
  saved datasets, 0-based as in `dataset[row]`), text truncated to `max_tokens` (then `truncated=True`).
- `rejected`: REJECTED rows: `missing_id`, `missing_text`, `empty_text`, `invalid_utf8`, `invalid_json`,
  `not_an_object`, `duplicate_id` (every occurrence after the first, ordered by file path then line / row).
- `sampled_out`: with `sample` set, the unique passages left out by sampling, as PASSAGE rows. Not rejections (nothing
  is wrong with them); the manifest reports them as the stage's `skipped`, so input = kept + rejected + sampled_out.
- `tallies`: the stage's manifest tallies (pipelines/accounting.py). Its input is every row read: blank JSONL lines
  are not rows; a text document counts one row per passage it was split into.

Beam counters (namespace `embforge.read_corpus`): `input`, `kept`, `skipped` (sampled out), `rejected`,
`rejected.<reason>` and `truncated` (kept passages that were cut to max_tokens).

A path that matches no file stops the pipeline at construction (`CorpusError`, from corpus_files.py). Files that exist
but hold no rows (empty files, empty Parquet shards) give 0 passages without an error: the run's manifest reports the
empty stage.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.accounting import TALLIES, CountingDoFn, CountRows, sum_tallies
from pipelines.json_lines import INVALID_JSON, INVALID_UTF8, JsonLine, json_type_name, read_json_lines
from pipelines.stages import rejected_row
from pipelines.stages.corpus_files import BUILTIN_STDLIB, CorpusFile, CorpusFormat, plan_corpus
from pipelines.stages.document_splitting import document_title, split_document
from pipelines.stdlib_corpus import stdlib_records

STAGE = "read_corpus"
#: Rows per Parquet / Arrow batch: bounds a worker's memory to one batch, whatever the file size.
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class ReadCorpusConfig:
    #: A file, folder or glob (local or any Beam filesystem, e.g. gs://b/corpus/*.jsonl), or builtin:python-stdlib.
    path: str = BUILTIN_STDLIB
    #: "auto" detects each file's format from its name (see the module docstring).
    format: CorpusFormat = "auto"
    #: Field names for JSONL, Parquet and saved datasets (BEIR always uses _id, title, text).
    id_field: str = "id"
    text_field: str = "text"
    title_field: str = "title"
    #: Passage length cap in approximate tokens (see `count_tokens`): 512 is the max sequence length of the BERT-size
    #: students and teachers the pipeline trains; longer text would be cut by them anyway.
    max_tokens: int = 512
    #: Target passage length when splitting .txt / .md documents: ~200 words is the size of BEIR / MS MARCO
    #: passages, and stays under max_tokens with room for punctuation.
    passage_words: int = 200
    #: Keep at most this many passages (after deduplication): those with the smallest hash of (seed, passage_id).
    sample: int | None = None
    #: Seed of the sampling hash; another seed draws another, equally deterministic, sample.
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must name a corpus file, folder or glob, or builtin:python-stdlib")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.passage_words < 1:
            raise ValueError(f"passage_words must be >= 1, got {self.passage_words}")
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"sample must be >= 1 or unset, got {self.sample}")
        for name in ("id_field", "text_field", "title_field"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")

    def fields(self, file_format: str) -> tuple[str, str, str]:
        """(id, text, title) field names for a file of `file_format`."""
        if file_format == "beir":
            return "_id", "text", "title"
        return self.id_field, self.text_field, self.title_field


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers: tokens, records, documents, sampling, deduplication. Finding the files is corpus_files.py; splitting a
# document into passages is document_splitting.py.


@dataclass(frozen=True)
class Location:
    """Where a row is: `source` for PASSAGE rows (`path:7`), `str()` for messages (`path line 7`)."""

    path: str
    number: int
    unit: Literal["line", "row"] = "line"

    @property
    def source(self) -> str:
        return f"{self.path}:{self.number}"

    def __str__(self) -> str:
        return f"{self.path} {self.unit} {self.number}"


@dataclass(frozen=True)
class RowOutcome:
    """One input row: the passage it became, or the rejected row saying why it did not."""

    source: str
    passage: dict[str, Any] | None = None
    rejected: dict[str, Any] | None = None

    @property
    def reason(self) -> str | None:
        return self.rejected["reason"] if self.rejected else None


# A word or a single punctuation mark. WordPiece / SentencePiece split rare words further, so this undercounts a
# model's tokens somewhat; the trainer's own max_length still applies. Not the model tokenizer, because this stage runs
# before any model is chosen or loaded, on every worker, and must give the same count everywhere at no cost.
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Approximate token count: words and punctuation marks (see `_TOKEN`)."""
    return sum(1 for _ in _TOKEN.finditer(text))


def truncate_to_tokens(text: str, max_tokens: int) -> tuple[str, bool]:
    """`text` cut after its `max_tokens`-th token (whitespace inside kept as is), and whether it was cut."""
    end = None
    for index, match in enumerate(_TOKEN.finditer(text)):
        if index == max_tokens:
            return text[:end].rstrip(), True
        end = match.end()
    return text, False


def _reject(location: Location, reason: str, payload: Any, detail: str, record_id: str | None = None) -> RowOutcome:
    # Unparseable rows have no passage id: their location is the id that lets someone find them.
    return RowOutcome(location.source, rejected=rejected_row(
        STAGE, reason, payload, record_id=record_id or location.source, detail=f"{location}: {detail}"))


def passage_from_record(
    record: Any,
    location: Location,
    *,
    id_field: str = "id",
    text_field: str = "text",
    title_field: str = "title",
    max_tokens: int = 512,
) -> RowOutcome:
    """A decoded record (JSON value, Parquet / dataset row) -> a PASSAGE row, or a rejection saying what is wrong."""
    if not isinstance(record, dict):
        return _reject(location, "not_an_object", record, f"expected an object with \"{id_field}\" and "
                       f"\"{text_field}\", got {json_type_name(record)}")
    raw_id = record.get(id_field)
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        return _reject(location, "missing_id", record, f"missing \"{id_field}\"")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        return _reject(location, "missing_id", record,
                       f"\"{id_field}\" must be a string or an integer, got {json_type_name(raw_id)}")
    passage_id = str(raw_id)
    text = record.get(text_field)
    if text is None:
        return _reject(location, "missing_text", record, f"missing \"{text_field}\"", passage_id)
    if not isinstance(text, str):
        return _reject(location, "missing_text", record,
                       f"\"{text_field}\" must be a string, got {json_type_name(text)}", passage_id)
    text = text.strip()
    if not text:
        return _reject(location, "empty_text", record, f"\"{text_field}\" is empty", passage_id)
    title = record.get(title_field)
    if isinstance(title, (int, float)) and not isinstance(title, bool):
        title = str(title)
    # Titles are optional context: an empty or non-text title is no title.
    title = (title.strip() or None) if isinstance(title, str) else None
    text, truncated = truncate_to_tokens(text, max_tokens)
    return RowOutcome(location.source, passage={
        "passage_id": passage_id,
        "title": title,
        "text": text,
        "source": location.source,
        "truncated": truncated,
    })


def passage_from_json_line(line: JsonLine, location: Location, **fields: Any) -> RowOutcome:
    """One JSONL line -> `passage_from_record` (which also words `not_an_object`), or `invalid_utf8` / `invalid_json`.

    `fields` are `passage_from_record`'s keyword arguments (field names, max_tokens).
    """
    if line.problem == INVALID_UTF8:
        # The raw bytes go to the payload (escaped by rejected_row), so the line can be repaired and replayed.
        return _reject(location, INVALID_UTF8, line.raw, line.detail)
    if line.problem == INVALID_JSON:
        return _reject(location, INVALID_JSON, line.text, line.detail)
    return passage_from_record(line.value, location, **fields)


def text_document_passages(data: bytes, path: str, relative_path: str, *, passage_words: int = 200,
                           max_tokens: int = 512) -> list[RowOutcome]:
    """A whole .txt / .md file's bytes -> one outcome per passage (`<relative_path>#<index>`), or one `invalid_utf8`."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        return [_reject(Location(path, line), "invalid_utf8", data,
                        f"not valid UTF-8 (byte {error.start} of the file: {data[error.start]:#04x}); the whole "
                        f"document is rejected", record_id=relative_path)]
    title = document_title(text, path)
    return [
        passage_from_record({"id": f"{relative_path}#{index}", "title": title, "text": passage}, Location(path, line),
                            max_tokens=max_tokens)
        for index, (line, passage) in enumerate(split_document(text, passage_words))
    ]


def sample_key(seed: int, passage_id: str) -> tuple[int, str]:
    """Sampling order: a stable 64-bit hash of (seed, passage_id), the id breaking (astronomically rare) ties.

    sha256, not `hash()`, which is salted per process and would draw another sample on every worker.
    """
    digest = hashlib.sha256(f"{seed}\x00{passage_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big"), passage_id


def split_first_occurrence(passage_id: str, occurrences: Iterable[tuple[Any, dict[str, Any]]]
                           ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(order key, PASSAGE row) of one id -> (the first row by order key, a `duplicate_id` rejection per other row)."""
    ordered = sorted(occurrences, key=lambda occurrence: occurrence[0])
    first = ordered[0][1]
    duplicates = [
        rejected_row(STAGE, "duplicate_id", row, record_id=passage_id,
                     detail=f"duplicate id {passage_id!r} at {row['source']}, first seen at {first['source']}")
        for _, row in ordered[1:]
    ]
    return first, duplicates


# ---------------------------------------------------------------------------------------------------------------------
# Reading one file (on a worker).


def read_jsonl(path: str, **fields: Any) -> Iterator[RowOutcome]:
    """Stream a JSON Lines file (compressed or not, any Beam filesystem) line by line; blank lines are not rows."""
    for line in read_json_lines(path):
        yield passage_from_json_line(line, Location(path, line.number), **fields)


def _records_of_batches(batches: Iterable[dict[str, list[Any]]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        columns = list(batch)
        yield from (dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True))


def _columns_to_read(available: list[str], wanted: tuple[str, ...]) -> list[str]:
    # Only the passage's columns (a corpus may carry big extra ones, e.g. embeddings); all of them when none of the
    # wanted ones exist, so the rejected rows show what the file does hold.
    present = [name for name in wanted if name in available]
    return present or list(available)


def read_parquet(path: str, size: int | None = None, **fields: Any) -> Iterator[RowOutcome]:
    """Stream a Parquet file one batch of rows at a time; an empty file (0 bytes or 0 rows) yields nothing."""
    import pyarrow.parquet as pq

    if size == 0:
        return
    wanted = (fields.get("id_field", "id"), fields.get("text_field", "text"), fields.get("title_field", "title"))
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        parquet = pq.ParquetFile(handle)
        columns = _columns_to_read(parquet.schema_arrow.names, wanted)
        batches = (batch.to_pydict() for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns))
        for row, record in enumerate(_records_of_batches(batches)):
            yield passage_from_record(record, Location(path, row, "row"), **fields)


def read_saved_dataset(path: str, **fields: Any) -> Iterator[RowOutcome]:
    """Rows of a `save_to_disk` folder (a Dataset, or every split of a DatasetDict in name order). Local only:
    `load_from_disk` memory-maps the Arrow files, so they are paged in batch by batch, never loaded whole."""
    import datasets

    loaded = datasets.load_from_disk(path)
    splits = [(path, loaded)] if isinstance(loaded, datasets.Dataset) else [
        (f"{path}/{name}", loaded[name]) for name in sorted(loaded)]
    wanted = (fields.get("id_field", "id"), fields.get("text_field", "text"), fields.get("title_field", "title"))
    for split_path, dataset in splits:
        dataset = dataset.select_columns(_columns_to_read(dataset.column_names, wanted))
        for row, record in enumerate(_records_of_batches(dataset.iter(batch_size=_BATCH_ROWS))):
            yield passage_from_record(record, Location(split_path, row, "row"), **fields)


def read_text_document(path: str, relative_path: str, **options: Any) -> list[RowOutcome]:
    with FileSystems.open(path) as handle:
        data = handle.read()
    return text_document_passages(data, path, relative_path, **options)


def read_corpus_file(corpus_file: CorpusFile, config: ReadCorpusConfig) -> Iterator[RowOutcome]:
    """Every row of one corpus file, in file order, as outcomes."""
    id_field, text_field, title_field = config.fields(corpus_file.format)
    fields = {"id_field": id_field, "text_field": text_field, "title_field": title_field,
              "max_tokens": config.max_tokens}
    if corpus_file.format in ("jsonl", "beir"):
        yield from read_jsonl(corpus_file.path, **fields)
    elif corpus_file.format == "parquet":
        yield from read_parquet(corpus_file.path, corpus_file.size, **fields)
    elif corpus_file.format == "save_to_disk":
        yield from read_saved_dataset(corpus_file.path, **fields)
    elif corpus_file.format == "text":
        yield from read_text_document(corpus_file.path, corpus_file.relative_path,
                                      passage_words=config.passage_words, max_tokens=config.max_tokens)
    elif corpus_file.format == "builtin":
        # Line numbers as in the JSONL that build_stdlib_corpus writes, so the two agree on `source`.
        for number, record in enumerate(stdlib_records(), 1):
            yield passage_from_record(record, Location(corpus_file.path, number), max_tokens=config.max_tokens)
    else:
        raise ValueError(f"{corpus_file.path}: unknown corpus format {corpus_file.format!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Beam.


class _ReadFileFn(CountingDoFn):
    """CorpusFile -> (passage_id, ((path, index), PASSAGE row)) and rejected rows; every row read counts as input
    (the stage's rows come into being here)."""

    def __init__(self, config: ReadCorpusConfig):
        super().__init__(STAGE)
        self._config = config

    def process(self, corpus_file: CorpusFile) -> Iterator[Any]:
        for index, outcome in enumerate(read_corpus_file(corpus_file, self._config)):
            self.tally.count("input")
            if outcome.rejected is not None:
                yield beam.pvalue.TaggedOutput("rejected", outcome.rejected)
            else:
                assert outcome.passage is not None
                # (path, index in file) orders duplicates: "first" means first file by path, then first in the file.
                yield outcome.passage["passage_id"], ((corpus_file.path, index), outcome.passage)


class _FirstOccurrenceFn(beam.DoFn):
    def process(self, element: tuple[str, Iterable[tuple[Any, dict[str, Any]]]]) -> Iterator[Any]:
        passage_id, occurrences = element
        first, duplicates = split_first_occurrence(passage_id, occurrences)
        yield first
        for duplicate in duplicates:
            yield beam.pvalue.TaggedOutput("rejected", duplicate)


class _KeepFn(beam.DoFn):
    """Unique passages -> kept, or `sampled_out` when sampling and the passage's key is above the threshold."""

    def __init__(self, seed: int, sampling: bool):
        self._seed = seed
        self._sampling = sampling
        self._truncated = beam.metrics.Metrics.counter(f"embforge.{STAGE}", "truncated")

    def process(self, row: dict[str, Any], threshold: tuple[int, str] | None = None) -> Iterator[Any]:
        if self._sampling and (threshold is None or sample_key(self._seed, row["passage_id"]) > threshold):
            yield beam.pvalue.TaggedOutput("sampled_out", row)
            return
        if row["truncated"]:
            self._truncated.inc()
        yield row


class ReadCorpus(beam.PTransform):
    """Root transform: `pipeline | ReadCorpus(config)` -> {"kept", "rejected", "sampled_out", "tallies"}.

    See the module docstring for formats and outputs. Raises `CorpusError` while being applied when the path matches
    no file.
    """

    def __init__(self, config: ReadCorpusConfig):
        super().__init__()
        self._config = config

    def expand(self, pbegin):
        config = self._config
        files = plan_corpus(config.path, config.format)
        read = (
            pbegin
            | "Files" >> beam.Create(files)
            # One file per element: spread the files over workers before the (possibly long) reads.
            | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadFileFn(config)).with_outputs("rejected", TALLIES, main="parsed")
        )
        unique = (
            read["parsed"]
            | "GroupById" >> beam.GroupByKey()
            | "FirstOccurrence" >> beam.ParDo(_FirstOccurrenceFn()).with_outputs("rejected", main="unique")
        )
        keep_fn = _KeepFn(config.seed, sampling=config.sample is not None)
        if config.sample is None:
            kept = unique["unique"] | "Keep" >> beam.ParDo(keep_fn).with_outputs("sampled_out", main="kept")
        else:
            seed = config.seed
            # Exact and deterministic: the threshold is the sample-th smallest key over the whole corpus, so the kept
            # set is the same whatever the sharding, bundle order or number of workers.
            threshold = (
                unique["unique"]
                | "SampleKeys" >> beam.Map(lambda row: sample_key(seed, row["passage_id"]))
                | "SmallestKeys" >> beam.combiners.Top.Smallest(config.sample)
                | "Threshold" >> beam.Map(lambda keys: max(keys) if keys else None)
            )
            kept = unique["unique"] | "Sample" >> beam.ParDo(
                keep_fn, threshold=beam.pvalue.AsSingleton(threshold)).with_outputs("sampled_out", main="kept")
        rejected = (read["rejected"], unique["rejected"]) | "Rejected" >> beam.Flatten()
        counted = {
            "kept": kept["kept"] | "CountKept" >> CountRows(STAGE, "kept"),
            "rejected": rejected | "CountRejected" >> CountRows(STAGE, "rejected"),
            "sampled_out": kept["sampled_out"] | "CountSkipped" >> CountRows(STAGE, "skipped"),
        }
        tallies = sum_tallies((read[TALLIES], *(output["tallies"] for output in counted.values())))
        return {**{name: output["rows"] for name, output in counted.items()}, "tallies": tallies}
