"""Stage 1, ReadCorpus: a corpus on disk (or `gs://`) -> PASSAGE rows, one per unique passage id.

Input: `ReadCorpusConfig.path`, a file, a folder or a glob, in one of these formats (auto-detected, or set `format`):
- `jsonl`: one JSON object per line (`.jsonl`, `.ndjson`, `.json`, optionally `.gz` / `.bz2` / `.zst` ...), fields
  `id_field`, `text_field`, `title_field`. Read line by line: a big file never sits whole in a worker's memory.
- `beir`: a BEIR `corpus.jsonl` (`_id`, `title`, `text`); a BEIR folder reads only its `corpus.jsonl`.
- `parquet`: same fields as JSONL, read one batch of rows at a time.
- `save_to_disk`: a folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`), read with
  `datasets.load_from_disk`. Local folders only: the Arrow files are memory-mapped, which Beam filesystems cannot do.
- `text`: `.txt` / `.md` files, each split into passages (see `split_document`); id `<relative path>#<index>`, title
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

A path that matches no file stops the pipeline at construction (`CorpusError`). Files that exist but hold no rows (empty
files, empty Parquet shards) give 0 passages without an error: the run's manifest reports the empty stage.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.accounting import TALLIES, CountingDoFn, CountRows, sum_tallies
from pipelines.config_loading import ConfigError
from pipelines.stages import rejected_row
from pipelines.stdlib_corpus import stdlib_records

LOGGER = logging.getLogger(__name__)

STAGE = "read_corpus"
BUILTIN_STDLIB = "builtin:python-stdlib"
BUILTIN_CORPORA = (BUILTIN_STDLIB,)

CorpusFormat = Literal["auto", "jsonl", "beir", "parquet", "save_to_disk", "text"]

#: File suffix -> format, for `format = "auto"`. `.json` is read as JSON Lines: most `.json` corpora are.
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
    ".txt": "text", ".md": "text", ".markdown": "text",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".deflate", ".zst", ".zstd", ".xz", ".lzma")
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
_BEIR_CORPUS_NAMES = ("corpus.jsonl", "corpus.jsonl.gz")
_GLOB_CHARS = re.compile(r"[*?\[]")
#: Rows per Parquet / Arrow batch: bounds a worker's memory to one batch, whatever the file size.
_BATCH_ROWS = 1024


class CorpusError(ConfigError):
    """The corpus setting names nothing readable; raised while the pipeline is built, before any work."""


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
# Pure helpers: tokens, records, documents, sampling, deduplication.


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


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


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
                       f"\"{text_field}\", got {_type_name(record)}")
    raw_id = record.get(id_field)
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        return _reject(location, "missing_id", record, f"missing \"{id_field}\"")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        return _reject(location, "missing_id", record,
                       f"\"{id_field}\" must be a string or an integer, got {_type_name(raw_id)}")
    passage_id = str(raw_id)
    text = record.get(text_field)
    if text is None:
        return _reject(location, "missing_text", record, f"missing \"{text_field}\"", passage_id)
    if not isinstance(text, str):
        return _reject(location, "missing_text", record,
                       f"\"{text_field}\" must be a string, got {_type_name(text)}", passage_id)
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


def parse_jsonl_line(raw: bytes, location: Location, **fields: Any) -> RowOutcome:
    """One JSONL line (bytes, line ending optional) -> `passage_from_record`, or `invalid_utf8` / `invalid_json`.

    `fields` are `passage_from_record`'s keyword arguments (field names, max_tokens).
    """
    raw = raw.rstrip(b"\r\n")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        # The raw bytes go to the payload (escaped by rejected_row), so the line can be repaired and replayed.
        return _reject(location, "invalid_utf8", raw, f"not valid UTF-8 (byte {error.start}: {raw[error.start]:#04x})")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return _reject(location, "invalid_json", line, f"not valid JSON ({error.msg} at column {error.colno})")
    return passage_from_record(record, location, **fields)


_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_THEMATIC_BREAK = re.compile(r"^ {0,3}(?:(?:\*[ \t]*){3,}|(?:-[ \t]*){3,}|(?:_[ \t]*){3,}|(?:=[ \t]*){3,})$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


@dataclass(frozen=True)
class _Block:
    line: int  # 1-based line where the block starts
    text: str
    heading: bool


def _blocks(text: str) -> list[_Block]:
    """Paragraphs (separated by blank lines) and headings (ATX `# x` or setext underlined), in order.

    A fenced code block is one paragraph even where it holds blank lines, so code is never split mid-block here.
    """
    blocks: list[_Block] = []
    lines: list[str] = []
    start = 0
    in_fence = False

    def flush() -> None:
        if lines:
            blocks.append(_Block(start, "\n".join(lines), False))
            lines.clear()

    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif in_fence:
            pass
        elif not line.strip():
            flush()
            continue
        elif heading := _HEADING.match(line):
            flush()
            blocks.append(_Block(number, heading.group(1), True))
            continue
        elif _SETEXT_UNDERLINE.match(line) and lines:
            # Under one line, an underline makes it a heading; under a longer paragraph it is read as a rule (markup),
            # not a heading: plain-text files underline whole paragraphs as separators.
            if len(lines) == 1:
                blocks.append(_Block(start, lines[0].strip(), True))
                lines.clear()
            flush()
            continue
        elif not lines and _THEMATIC_BREAK.match(line):
            continue  # a horizontal rule is markup, not text
        if not lines:
            start = number
        lines.append(line)
    flush()
    return blocks


def _word_count(text: str) -> int:
    return len(text.split())


def _split_long(block: _Block, target_words: int) -> list[tuple[int, str]]:
    """A paragraph over the target -> pieces of about `target_words`, cut between lines where it has lines (so code
    and lists keep their shape), and between words inside a single overlong line."""
    pieces: list[tuple[int, str]] = []
    current: list[str] = []
    current_start = block.line
    words = 0
    for offset, line in enumerate(block.text.split("\n")):
        number = block.line + offset
        line_words = line.split()
        if len(line_words) > target_words:
            if current:
                pieces.append((current_start, "\n".join(current)))
                current, words = [], 0
            pieces += [(number, " ".join(line_words[i:i + target_words]))
                       for i in range(0, len(line_words), target_words)]
            continue
        if current and words + len(line_words) > target_words:
            pieces.append((current_start, "\n".join(current)))
            current, words = [], 0
        if not current:
            current_start = number
        current.append(line)
        words += len(line_words)
    if current:
        pieces.append((current_start, "\n".join(current)))
    return pieces


def split_document(text: str, target_words: int = 200) -> list[tuple[int, str]]:
    """A .txt / .md document -> passages as (1-based start line, text).

    Headings start a new passage and are kept as its first line (without `#`), so a passage says what it is about;
    headings with no text of their own join the next passage. Paragraphs of one section are merged while the passage
    stays within `target_words`; a paragraph over the target is split (between lines, else between words). Nothing is
    dropped except markup (blank lines, `#` markers, setext underlines, horizontal rules).
    """
    passages: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    words = 0
    pending_headings: list[_Block] = []

    def flush() -> None:
        nonlocal words
        if parts:
            passages.append((start, "\n\n".join(parts)))
            parts.clear()
            words = 0

    for block in _blocks(text):
        if block.heading:
            flush()
            pending_headings.append(block)
            continue
        pieces = _split_long(block, target_words) if _word_count(block.text) > target_words else [
            (block.line, block.text)]
        for line, piece in pieces:
            piece_words = _word_count(piece)
            if parts and words + piece_words > target_words:
                flush()
            if not parts:
                start = pending_headings[0].line if pending_headings else line
                parts.extend(heading.text for heading in pending_headings)
                words = sum(_word_count(heading.text) for heading in pending_headings)
                pending_headings.clear()
            parts.append(piece)
            words += piece_words
    flush()
    if pending_headings:  # trailing headings with no text after them: still text of the document
        passages.append((pending_headings[0].line, "\n\n".join(heading.text for heading in pending_headings)))
    return passages


def _file_stem(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def document_title(text: str, path: str) -> str:
    """The document's first heading, else its file stem (`docs/install.md` -> `install`)."""
    for block in _blocks(text):
        if block.heading:
            return block.text
    return _file_stem(path)


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
# Finding the files (at pipeline construction) and reading one (on a worker).


@dataclass(frozen=True)
class CorpusFile:
    """One unit of reading: a file, a saved dataset folder, or a builtin corpus."""

    path: str
    format: str
    #: Path relative to the corpus root, used in text passage ids so they do not depend on where the corpus lies.
    relative_path: str
    size: int | None = None


def detect_format(path: str) -> str | None:
    """The format a file's name says (`corpus.jsonl` -> beir, `a.jsonl.gz` -> jsonl), None when it says nothing."""
    name = path.replace("\\", "/").rsplit("/", 1)[-1].lower()
    compressed = False
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name, compressed = name.removesuffix(suffix), True
    if name == "corpus.jsonl":
        return "beir"
    dot = name.rfind(".")
    file_format = _SUFFIX_FORMATS.get(name[dot:]) if dot > 0 else None
    # Parquet compresses inside the file; an externally compressed one is not something pyarrow can open.
    return None if compressed and file_format == "parquet" else file_format


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    if not root:
        return path
    return path[len(root) + 1:] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def _is_hidden(relative_path: str) -> bool:
    # .git/, .ipynb_checkpoints/, .DS_Store: tool files inside a corpus folder, never corpus text.
    return any(part.startswith(".") and part not in (".", "..") for part in relative_path.split("/"))


def _is_local_folder(path: str) -> bool:
    # An empty local folder "exists" for FileSystems like a file does; object stores have no empty folders.
    return "://" not in path and os.path.isdir(path)


def _match(pattern: str) -> list[tuple[str, int]]:
    return sorted((metadata.path, metadata.size_in_bytes)
                  for result in FileSystems.match([pattern]) for metadata in result.metadata_list)


def plan_corpus(config: ReadCorpusConfig) -> tuple[CorpusFile, ...]:
    """The files `config.path` names, each with its format, sorted by path. Raises `CorpusError` when there are none.

    Runs on the launcher while the pipeline is built, so a wrong path fails before any worker starts.
    """
    path = config.path
    if path.startswith("builtin:"):
        if path not in BUILTIN_CORPORA:
            raise CorpusError(f"unknown builtin corpus {path!r} (known: {', '.join(BUILTIN_CORPORA)})")
        return (CorpusFile(path, "builtin", path),)

    explicit_file = False
    if _GLOB_CHARS.search(path):
        # Relative paths are taken from the folder above the first wildcard: data/*/x.md -> <dir>/x.md.
        root = _GLOB_CHARS.split(path, maxsplit=1)[0].rsplit("/", 1)[0]
        matched = _match(path)
    else:
        root = path.rstrip("/")
        if config.format in ("auto", "save_to_disk") and any(
                FileSystems.exists(FileSystems.join(root, marker)) for marker in _SAVE_TO_DISK_MARKERS):
            return (CorpusFile(root, "save_to_disk", root.rsplit("/", 1)[-1]),)
        matched = _match(FileSystems.join(root, "**"))  # a folder: every file below it
        if matched and config.format in ("auto", "beir"):
            beir_corpus = [entry for entry in matched if _relative(entry[0], root) in _BEIR_CORPUS_NAMES]
            matched = beir_corpus or matched  # a BEIR folder also holds queries and qrels, which are not the corpus
        elif not matched and FileSystems.exists(root) and not _is_local_folder(root):
            matched = _match(root)
            root = root.rsplit("/", 1)[0] if "/" in root else ""
            explicit_file = True
    if config.format == "save_to_disk":
        raise CorpusError(f"corpus path {path} is not a folder written by save_to_disk "
                          f"(no {' / '.join(_SAVE_TO_DISK_MARKERS)} in it)")
    if not matched:
        raise CorpusError(f"corpus path {path} matches no files")

    files: list[CorpusFile] = []
    skipped: list[str] = []
    for file_path, size in matched:
        relative_path = _relative(file_path, root)
        if _is_hidden(relative_path) and not explicit_file:
            continue
        file_format = config.format if config.format != "auto" else detect_format(file_path)
        if file_format is None:
            if explicit_file:
                raise CorpusError(f"cannot tell the format of {file_path} from its name; set format to one of "
                                  f"jsonl, beir, parquet, text")
            skipped.append(relative_path)
            continue
        files.append(CorpusFile(file_path, file_format, relative_path, size))
    if skipped:
        LOGGER.warning("corpus path %s: skipping %d files of no known format (e.g. %s); set format to read them",
                       path, len(skipped), ", ".join(skipped[:3]))
    if not files:
        hint = "; a save_to_disk dataset is read from its folder" if any(
            name.endswith(".arrow") for name in skipped) else "; set format to read them anyway"
        raise CorpusError(f"corpus path {path} matches no corpus files ({len(matched)} file(s), none of them "
                          f"{', '.join(sorted(_SUFFIX_FORMATS))}){hint}")
    return tuple(files)


def read_jsonl(path: str, **fields: Any) -> Iterator[RowOutcome]:
    """Stream a JSON Lines file (compressed or not, any Beam filesystem) line by line; blank lines are not rows."""
    with FileSystems.open(path) as handle:  # AUTO compression: .gz, .bz2, .zst ... by suffix
        for number, raw in enumerate(iter(handle.readline, b""), 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():
                yield parse_jsonl_line(raw, Location(path, number), **fields)


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
        files = plan_corpus(config)
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
