"""Evaluation data: BEIR retrieval folders and labeled classification files, read and checked line by line.

Separate from the evaluator (embedder/evaluate.py), which only scores what these readers return: the file formats and
the errors they raise live here. Files are read through Beam filesystems, so local paths and gs:// work alike (`.gz`
decompressed by suffix); a malformed row stops the run with an `EvalDataError` naming the file, the line and the field.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import logging
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.json_lines import read_json_lines

LOGGER = logging.getLogger(__name__)


class EvalDataError(ValueError):
    """Evaluation data that cannot be used; the message names the file, the line and the field."""


@dataclass(frozen=True)
class BeirData:
    corpus_ids: tuple[str, ...]
    #: `title + " " + text`, stripped (BEIR's convention for dense retrievers).
    corpus_texts: tuple[str, ...]
    #: Only the queries judged in the split, in the order the qrels file first names them.
    query_ids: tuple[str, ...]
    query_texts: tuple[str, ...]
    #: query id -> passage id -> graded relevance, as pytrec_eval takes it.
    qrels: dict[str, dict[str, int]]
    #: Judgements naming a passage absent from the corpus: they stay in the qrels (a relevant passage that can never be
    #: retrieved lowers recall, as in BEIR) and are reported, since they usually mean a mismatched corpus.
    unknown_corpus_ids: int = 0


@dataclass(frozen=True)
class LabeledData:
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    #: Rows in the file before subsampling.
    total: int


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) for every line of a file on any Beam filesystem."""
    with FileSystems.open(path) as handle:  # AUTO compression: .gz and friends by suffix
        for number, raw in enumerate(iter(handle.readline, b""), 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise EvalDataError(f"{path} line {number}: not UTF-8 ({error})") from error


def _json_objects(path: str) -> Iterator[tuple[int, dict]]:
    """The JSON objects of a JSON Lines file with their line numbers; blank lines are skipped, any bad line stops the
    read with an error naming the file and line."""
    for line in read_json_lines(path):
        if line.problem is not None:
            raise EvalDataError(f"{path} line {line.number}: {line.detail}")
        yield line.number, line.value


def _read_jsonl(path: str, required: Sequence[str], optional: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """`_json_objects` reduced to the named fields, string values only (an integer `_id` is taken as its decimal
    string, since qrels name ids as text)."""
    for number, record in _json_objects(path):
        fields: dict[str, str] = {}
        for name in (*required, *optional):
            value = record.get(name)
            if value is None:
                if name in required:
                    raise EvalDataError(f'{path} line {number}: missing "{name}"')
                value = ""
            if isinstance(value, int) and not isinstance(value, bool) and name == "_id":
                value = str(value)
            if not isinstance(value, str):
                raise EvalDataError(f'{path} line {number}: "{name}" must be a string, got {type(value).__name__}')
            fields[name] = value
        yield number, fields


def read_qrels(path: str, known_queries: Container[str] | None = None) -> dict[str, dict[str, int]]:
    """`query-id corpus-id score`, tab-separated; the header line is optional (BEIR writes one). A query id outside
    `known_queries` (when given) is an error: a judged query without text cannot be evaluated."""
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    for number, line in _lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        columns = line.split("\t")
        if number == 1 and [column.strip().lower() for column in columns] == ["query-id", "corpus-id", "score"]:
            continue
        if len(columns) != 3:
            raise EvalDataError(f"{path} line {number}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                                f"got {len(columns)}: {line[:80]!r}")
        query_id, corpus_id, score = (column.strip() for column in columns)
        for name, value in (("query-id", query_id), ("corpus-id", corpus_id)):
            if not value:
                raise EvalDataError(f'{path} line {number}: empty "{name}"')
        if known_queries is not None and query_id not in known_queries:
            raise EvalDataError(f'{path} line {number}: "query-id" {query_id!r} is not in queries.jsonl')
        try:
            relevance = int(score)
        except ValueError:
            raise EvalDataError(f'{path} line {number}: "score" must be an integer, got {score!r}') from None
        if (query_id, corpus_id) in first_line:
            raise EvalDataError(f"{path} line {number}: duplicate judgement of query {query_id!r} and passage "
                                f"{corpus_id!r} (first on line {first_line[query_id, corpus_id]})")
        first_line[query_id, corpus_id] = number
        qrels.setdefault(query_id, {})[corpus_id] = relevance
    if not qrels:
        raise EvalDataError(f"{path}: no judgements")
    return qrels


def load_beir(data_dir: str, split: str = "test") -> BeirData:
    """Read a BEIR-format folder; see `embedder.evaluate.RetrievalTask`. Every line is validated, judged or not."""
    corpus_path = FileSystems.join(data_dir, "corpus.jsonl")
    queries_path = FileSystems.join(data_dir, "queries.jsonl")
    qrels_path = FileSystems.join(data_dir, "qrels", f"{split}.tsv")
    for path in (corpus_path, queries_path, qrels_path):
        if not FileSystems.exists(path):
            raise FileNotFoundError(f"{path} not found: a BEIR folder holds corpus.jsonl, queries.jsonl and "
                                    f"qrels/<split>.tsv")
    query_text: dict[str, str] = {}
    for number, record in _read_jsonl(queries_path, ("_id", "text")):
        if record["_id"] in query_text:
            raise EvalDataError(f'{queries_path} line {number}: duplicate "_id" {record["_id"]!r}')
        query_text[record["_id"]] = record["text"]
    qrels = read_qrels(qrels_path, query_text)

    corpus_ids: list[str] = []
    corpus_texts: list[str] = []
    seen: set[str] = set()
    for number, record in _read_jsonl(corpus_path, ("_id", "text"), optional=("title",)):
        if record["_id"] in seen:
            raise EvalDataError(f'{corpus_path} line {number}: duplicate "_id" {record["_id"]!r}')
        seen.add(record["_id"])
        corpus_ids.append(record["_id"])
        corpus_texts.append(f"{record['title']} {record['text']}".strip())
    if not corpus_ids:
        raise EvalDataError(f"{corpus_path}: no passages")
    unknown = sum(corpus_id not in seen for judged in qrels.values() for corpus_id in judged)
    if unknown:
        LOGGER.warning("%s: %d judgement(s) name passages absent from %s", qrels_path, unknown, corpus_path)
    query_ids = tuple(qrels)
    return BeirData(tuple(corpus_ids), tuple(corpus_texts), query_ids, tuple(query_text[q] for q in query_ids), qrels,
                    unknown)


def _read_csv(path: str) -> tuple[list[str], Iterator[tuple[int, dict[str, str | None]]]]:
    """(header, rows with their line numbers) of a CSV, or TSV by suffix."""
    with FileSystems.open(path) as handle:
        text = handle.read().decode("utf-8-sig")
    delimiter = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = list(reader.fieldnames or [])
    # line_num is the row's last physical line, so a quoted multi-line text still points into the right place.
    return header, ((reader.line_num, row) for row in reader)


def load_labeled(path: str, text_field: str = "text", label_field: str = "label", max_rows: int | None = None,
                 seed: int = 0) -> LabeledData:
    """Texts and labels (as strings) from a CSV/TSV (header row) or JSON Lines file, optionally a seeded subset."""
    base = path.lower().removesuffix(".gz")
    texts: list[str] = []
    labels: list[str] = []
    if base.endswith((".csv", ".tsv")):
        header, rows = _read_csv(path)
        for number, row in rows:
            for name in (text_field, label_field):
                if row.get(name) is None:
                    raise EvalDataError(f'{path} line {number}: missing "{name}" (header: {",".join(header)})')
            texts.append(row[text_field] or "")
            labels.append(row[label_field] or "")
            if not labels[-1].strip():
                raise EvalDataError(f'{path} line {number}: empty "{label_field}"')
    elif base.endswith((".jsonl", ".json")):
        for number, record in _json_objects(path):
            for name in (text_field, label_field):
                if record.get(name) is None:
                    raise EvalDataError(f'{path} line {number}: missing "{name}"')
            if not isinstance(record[text_field], str):
                raise EvalDataError(f'{path} line {number}: "{text_field}" must be a string')
            texts.append(record[text_field])
            labels.append(str(record[label_field]))
    else:
        raise EvalDataError(f"{path}: unknown format; expected .csv, .tsv or .jsonl (optionally .gz)")
    if not texts:
        raise EvalDataError(f"{path}: no rows")
    total = len(texts)
    if max_rows is not None and max_rows < total:
        # Seeded by the run seed and the file name, so train and test subsets are drawn independently and reproducibly.
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "little")])
        keep = np.sort(rng.choice(total, size=max_rows, replace=False))
        texts = [texts[index] for index in keep]
        labels = [labels[index] for index in keep]
    return LabeledData(tuple(texts), tuple(labels), total)

