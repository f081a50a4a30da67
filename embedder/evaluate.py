"""Evaluate any `Embedder` on retrieval (BEIR layout) and classification, at Matryoshka dimensions, float32 and int8.

The evaluator sees models only through the `Embedder` interface, so the base student, a trained student, Gemini and
the test fakes are measured by the same code. Each text set is encoded once per model, at the model's full dimension;
every smaller dimension is a truncation of those vectors (re-normalized), never a second encoding.

Retrieval (`RetrievalTask`): the corpus is embedded as RETRIEVAL_DOCUMENT from `title + " " + text` (stripped), the
convention of BEIR's own dense-retrieval models, and the queries judged in `qrels/<split>.tsv` as RETRIEVAL_QUERY.
Exact inner-product search (faiss `IndexFlatIP`) keeps the top 100 passages per query; pytrec_eval scores the run:
nDCG@10, MRR@10 and Recall@100.

Classification (`ClassificationTask`): logistic regression on the train embeddings (CLASSIFICATION task type), accuracy
and macro-F1 on the test embeddings.

int8 (`Int8Quantizer`): symmetric, one scale per dimension, calibrated on the vectors a deployment would store (the
corpus; the train set for classification): scale_j = max_i |x_ij| / 127, code = clip(round(x / scale), -127, 127).
Queries and test texts are quantized with that same scale (values beyond the calibrated range clip). Scores are dot
products of the dequantized vectors (code * scale), i.e. what an int8 index scores after reconstructing its vectors.
Each component's round-trip error is at most scale_j / 2 (within the calibrated range), which bounds the score error:
|x.y - x'.y'| <= sum_j (|x_j| + |y'_j|) * scale_j / 2.

`evaluate_models` compares models side by side and writes report.json, report.md and report.png (see `embedder.report`).
Every difference to the baseline (the first model) comes with a 95% paired-bootstrap interval over the queries (test
texts for classification): the difference of a few hundred queries is noisy, and a gain the interval does not separate
from zero is not shown to be one. The report states each model's window (tokens read per text); `embforge evaluate`
gives every model the same one unless told otherwise.
Data files are read through Beam filesystems, so local paths and gs:// work alike; a malformed row stops the run with
an `EvalDataError` naming the file, the line and the field.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
import pytrec_eval
from apache_beam.io.filesystems import FileSystems

from pipelines.clients.base import Embedder, TaskType, truncate_and_normalize

LOGGER = logging.getLogger(__name__)

#: 2: per-model window (`max_seq_length`), and each difference to the baseline with its bootstrap interval.
REPORT_VERSION = 2
#: Passages kept per query: Recall@100 needs the top 100, and nDCG@10 / MRR@10 read the head of the same list.
TOP_K = 100
#: MRR is cut at rank 10, as in MTEB and BEIR.
MRR_CUTOFF = 10
#: Texts per `Embedder.embed` call: small enough for the progress bar to move, large enough to keep a backend's own
#: batches (32 for LocalEmbedder, 100 per Gemini request) full.
ENCODE_CHUNK = 256
#: Logistic-regression iterations: lbfgs converges on normalized embeddings in a few hundred; sklearn's default 100
#: stops early (ConvergenceWarning) on 77-class Banking77.
CLASSIFIER_MAX_ITER = 1000
#: Environment variable naming the shared evaluation data folder (SciFact, Banking77), see `find_shared_data`.
SHARED_DATA_ENV = "EMBFORGE_SHARED_DATA"

RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "recall@100")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
PRECISIONS = ("float32", "int8")


class EvalDataError(ValueError):
    """Evaluation data that cannot be used; the message names the file, the line and the field."""


# --- tasks ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalTask:
    """A BEIR-format folder: corpus.jsonl (`_id`, `title`, `text`), queries.jsonl (`_id`, `text`),
    qrels/<split>.tsv (header `query-id corpus-id score`). Only queries judged in the split are evaluated."""

    name: str
    data_dir: str
    split: str = "test"

    kind: ClassVar[str] = "retrieval"
    metrics: ClassVar[tuple[str, ...]] = RETRIEVAL_METRICS


@dataclass(frozen=True)
class ClassificationTask:
    """Labeled CSV or JSON Lines files (by suffix; .gz allowed). `max_train` / `max_test` keep a seeded random subset
    of each split (in file order) to bound CPU time; None keeps every row."""

    name: str
    train_path: str
    test_path: str
    text_field: str = "text"
    label_field: str = "label"
    max_train: int | None = None
    max_test: int | None = None
    #: Seeds the subsets and the classifier.
    seed: int = 0

    kind: ClassVar[str] = "classification"
    metrics: ClassVar[tuple[str, ...]] = CLASSIFICATION_METRICS


EvalTask = RetrievalTask | ClassificationTask


def find_shared_data() -> Path | None:
    """The shared evaluation data folder: `$EMBFORGE_SHARED_DATA`, else `shared/data` beside the repository checkout
    (`../shared/data` from the repo root). None when it does not exist (a fresh machine has none)."""
    configured = os.environ.get(SHARED_DATA_ENV)
    folder = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data"
    return folder if folder.is_dir() else None


# --- reading data -----------------------------------------------------------------------------------------------------


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
    """The JSON objects of a JSON Lines file with their line numbers; blank lines are skipped."""
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{path} line {number}: invalid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise EvalDataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


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
    """Read a BEIR-format folder; see `RetrievalTask`. Every line is validated, judged or not."""
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


# --- int8 -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Quantizer:
    """Symmetric per-dimension int8 quantization (see the module docstring for the scheme and its error bound)."""

    #: Step per dimension, shape (d,): max |x_j| over the calibration vectors / 127.
    scale: np.ndarray

    @classmethod
    def calibrate(cls, vectors: np.ndarray) -> Int8Quantizer:
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"int8 calibration needs a non-empty (n, d) array, got shape {vectors.shape}")
        peak = np.abs(vectors).max(axis=0).astype(np.float32)
        # A dimension that is zero on every calibration vector gets any positive step: its codes are 0 either way.
        return cls(np.where(peak > 0, peak / 127.0, 1.0 / 127.0).astype(np.float32))

    def quantize(self, vectors: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(vectors / self.scale), -127, 127).astype(np.int8)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(codes.astype(np.float32) * self.scale)

    def roundtrip(self, vectors: np.ndarray) -> np.ndarray:
        return self.dequantize(self.quantize(vectors))


# --- encoding ---------------------------------------------------------------------------------------------------------


@dataclass
class EncodingStats:
    texts_encoded: int = 0
    embed_calls: int = 0
    cache_hits: int = 0
    seconds: float = 0.0


class EncodingCache:
    """Full-dimension vectors per (model, task type, text set): within a run each text set is encoded once per model,
    so two splits of one BEIR folder share the corpus encoding, and every dimension reuses it."""

    def __init__(self, show_progress: bool = True):
        self._vectors: dict[tuple[str, str, str], np.ndarray] = {}
        self.stats: dict[str, EncodingStats] = {}
        self._show_progress = show_progress

    def encode(self, model_name: str, embedder: Embedder, texts: Sequence[str], task_type: TaskType,
               description: str) -> np.ndarray:
        digest = hashlib.sha256()
        for text in texts:
            digest.update(text.encode("utf-8"))
            digest.update(b"\x00")  # separator: ("ab", "c") and ("a", "bc") are different sets
        key = (model_name, TaskType(task_type).value, digest.hexdigest())
        stats = self.stats.setdefault(model_name, EncodingStats())
        if key in self._vectors:
            stats.cache_hits += 1
            return self._vectors[key]
        started = time.perf_counter()
        vectors = self._encode(model_name, embedder, texts, task_type, description, stats)
        stats.seconds += time.perf_counter() - started
        stats.texts_encoded += len(texts)
        LOGGER.info("%s: encoded %d %s texts in %.1f s", model_name, len(texts), description,
                    time.perf_counter() - started)
        self._vectors[key] = vectors
        return vectors

    def _encode(self, model_name: str, embedder: Embedder, texts: Sequence[str], task_type: TaskType,
                description: str, stats: EncodingStats) -> np.ndarray:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        dimension = embedder.native_dimension
        vectors = np.zeros((len(texts), dimension), dtype=np.float32)
        # Longest first, across the whole set: chunking would otherwise defeat the backend's own length sorting, and
        # a chunk of similar lengths pads little.
        order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), disable=not self._show_progress)
        with progress:
            bar = progress.add_task(f"{model_name}: {description}", total=len(texts))
            for start in range(0, len(order), ENCODE_CHUNK):
                chunk = order[start:start + ENCODE_CHUNK]
                embedded = np.asarray(embedder.embed([texts[index] for index in chunk], task_type), dtype=np.float32)
                stats.embed_calls += 1
                if embedded.shape != (len(chunk), dimension):
                    raise ValueError(f"model {model_name!r} ({embedder.model_id}) returned shape {embedded.shape} for "
                                     f"{len(chunk)} texts; expected ({len(chunk)}, {dimension})")
                if not np.isfinite(embedded).all():
                    raise ValueError(f"model {model_name!r} ({embedder.model_id}) returned NaN or infinite values")
                vectors[chunk] = embedded
                progress.advance(bar, len(chunk))
                # Rich draws nothing until the end when stderr is a file (nohup, CI): log the count instead.
                if self._show_progress and not progress.console.is_terminal and start + len(chunk) < len(order):
                    LOGGER.info("%s: %s %d/%d", model_name, description, start + len(chunk), len(order))
        return vectors


# --- retrieval --------------------------------------------------------------------------------------------------------


def search(corpus: np.ndarray, queries: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (scores, corpus indices), each (n_queries, min(k, n_corpus)), best first."""
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(corpus)))


def build_run(query_ids: Sequence[str], corpus_ids: Sequence[str], scores: np.ndarray,
              indices: np.ndarray) -> dict[str, dict[str, float]]:
    """pytrec_eval's run format: query id -> passage id -> score (faiss pads missing hits with index -1)."""
    return {query_id: {corpus_ids[index]: float(score) for score, index in zip(row_scores, row_indices, strict=True)
                       if index >= 0}
            for query_id, row_scores, row_indices in zip(query_ids, scores, indices, strict=True)}


def retrieval_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]) -> dict:
    """nDCG@10, MRR@10 and Recall@100 with pytrec_eval, averaged over every judged query (one without hits counts 0)."""
    return {metric: float(values.mean()) for metric, values in per_query_retrieval_metrics(qrels, run).items()}


def per_query_retrieval_metrics(qrels: Mapping[str, Mapping[str, int]],
                                run: Mapping[str, Mapping[str, float]]) -> dict[str, np.ndarray]:
    """Each metric per judged query, in the qrels' query order (the sample a paired bootstrap resamples).

    trec_eval has no rank cut for reciprocal rank (`recip_rank` looks down the whole run), so MRR@10 is `recip_rank`
    on the run truncated to each query's 10 best passages: a first relevant hit below rank 10 then counts 0.
    """
    qrels = {query: dict(judged) for query, judged in qrels.items()}
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    # trec_eval orders a run by score, so the 10 best by score are the head it would read.
    head = {query: dict(sorted(hits.items(), key=lambda item: -item[1])[:MRR_CUTOFF]) for query, hits in run.items()}
    ranks = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(head)

    def per_query(results: dict[str, dict[str, float]], measure: str) -> np.ndarray:
        return np.array([results.get(query, {}).get(measure, 0.0) for query in qrels], dtype=np.float64)

    return {"ndcg@10": per_query(full, "ndcg_cut_10"), "mrr@10": per_query(ranks, "recip_rank"),
            "recall@100": per_query(full, "recall_100")}


def evaluate_retrieval(model_name: str, embedder: Embedder, data: BeirData, dims: Sequence[int], int8: bool,
                       cache: EncodingCache, task_name: str = "retrieval") -> list[dict[str, Any]]:
    """Result rows (one per dimension and precision) for one model on one BEIR split."""
    corpus = cache.encode(model_name, embedder, data.corpus_texts, TaskType.RETRIEVAL_DOCUMENT, f"{task_name} corpus")
    queries = cache.encode(model_name, embedder, data.query_texts, TaskType.RETRIEVAL_QUERY, f"{task_name} queries")
    rows = []
    for dimension in dims:
        corpus_d, queries_d = truncate_and_normalize(corpus, dimension), truncate_and_normalize(queries, dimension)
        variants = [("float32", corpus_d, queries_d)]
        if int8:
            quantizer = Int8Quantizer.calibrate(corpus_d)
            variants.append(("int8", quantizer.roundtrip(corpus_d), quantizer.roundtrip(queries_d)))
        for precision, corpus_vectors, query_vectors in variants:
            scores, indices = search(corpus_vectors, query_vectors)
            run = build_run(data.query_ids, data.corpus_ids, scores, indices)
            per_query = per_query_retrieval_metrics(data.qrels, run)
            row = _row(task_name, "retrieval", model_name, dimension, precision,
                       {metric: float(values.mean()) for metric, values in per_query.items()})
            rows.append({**row, SAMPLES: ItemScores(per_query)})
    return rows


# --- classification ---------------------------------------------------------------------------------------------------


def predict_labels(train: np.ndarray, train_labels: Sequence[str], test: np.ndarray, seed: int = 0) -> list[str]:
    """The labels a logistic regression fitted on `train` gives the `test` vectors."""
    # sklearn costs a second to import; only classification needs it.
    from sklearn.linear_model import LogisticRegression

    if len(set(train_labels)) < 2:
        raise EvalDataError(f"classification needs at least 2 labels in the train set, got {sorted(set(train_labels))}")
    classifier = LogisticRegression(max_iter=CLASSIFIER_MAX_ITER, random_state=seed)
    classifier.fit(train, list(train_labels))
    return [str(label) for label in classifier.predict(test)]


def classification_metrics(train: np.ndarray, train_labels: Sequence[str], test: np.ndarray,
                           test_labels: Sequence[str], seed: int = 0) -> dict[str, float]:
    """Accuracy and macro-F1 of a logistic regression fitted on `train`."""
    samples = ClassificationSamples.of(test_labels, predict_labels(train, train_labels, test, seed))
    everything = np.arange(samples.size)
    return {metric: samples.statistic(metric, everything) for metric in CLASSIFICATION_METRICS}


def evaluate_classification(model_name: str, embedder: Embedder, train: LabeledData, test: LabeledData,
                            dims: Sequence[int], int8: bool, cache: EncodingCache, task_name: str = "classification",
                            seed: int = 0) -> list[dict[str, Any]]:
    """Result rows (one per dimension and precision) for one model on one train/test pair."""
    train_vectors = cache.encode(model_name, embedder, train.texts, TaskType.CLASSIFICATION, f"{task_name} train")
    test_vectors = cache.encode(model_name, embedder, test.texts, TaskType.CLASSIFICATION, f"{task_name} test")
    rows = []
    for dimension in dims:
        train_d = truncate_and_normalize(train_vectors, dimension)
        test_d = truncate_and_normalize(test_vectors, dimension)
        variants = [("float32", train_d, test_d)]
        if int8:
            quantizer = Int8Quantizer.calibrate(train_d)
            variants.append(("int8", quantizer.roundtrip(train_d), quantizer.roundtrip(test_d)))
        for precision, train_x, test_x in variants:
            samples = ClassificationSamples.of(test.labels, predict_labels(train_x, train.labels, test_x, seed))
            everything = np.arange(samples.size)
            row = _row(task_name, "classification", model_name, dimension, precision,
                       {metric: samples.statistic(metric, everything) for metric in CLASSIFICATION_METRICS})
            rows.append({**row, SAMPLES: samples})
    return rows


# --- confidence intervals ---------------------------------------------------------------------------------------------

#: Key of a result row's per-query (or per-text) outcomes while the report is assembled; never written to report.json.
SAMPLES = "_samples"
#: Bootstrap resamples per interval: enough for stable 2.5th / 97.5th percentiles at a few seconds per report.
BOOTSTRAP_RESAMPLES = 2000
#: Seeds the resampling, so a report's intervals are the same on every run.
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class ItemScores:
    """A result's metrics per item: per judged query for retrieval (in the qrels' query order), or any per-text score
    (e.g. a classifier's correctness averaged over training seeds)."""

    per_item: Mapping[str, np.ndarray]

    @property
    def size(self) -> int:
        return len(next(iter(self.per_item.values())))

    def statistic(self, metric: str, indices: np.ndarray) -> float:
        return float(self.per_item[metric][indices].mean())


@dataclass(frozen=True)
class ClassificationSamples:
    """One classification result's true and predicted label per test text, as label codes."""

    true: np.ndarray
    predicted: np.ndarray
    labels: int

    @classmethod
    def of(cls, true: Sequence[str], predicted: Sequence[str]) -> ClassificationSamples:
        names = {name: code for code, name in enumerate(sorted(set(true) | set(predicted)))}
        return cls(np.array([names[name] for name in true]), np.array([names[name] for name in predicted]),
                   len(names))

    @property
    def size(self) -> int:
        return len(self.true)

    def statistic(self, metric: str, indices: np.ndarray) -> float:
        true, predicted = self.true[indices], self.predicted[indices]
        if metric == "accuracy":
            return float((true == predicted).mean())
        # Macro-F1 over the labels present in the (resampled) true or predicted labels, as sklearn averages it; a
        # label with no true and no predicted text is not a label of this sample.
        hits = np.bincount(true[true == predicted], minlength=self.labels)
        true_counts = np.bincount(true, minlength=self.labels)
        predicted_counts = np.bincount(predicted, minlength=self.labels)
        present = (true_counts + predicted_counts) > 0
        f1 = 2 * hits[present] / (true_counts[present] + predicted_counts[present])
        return float(f1.mean())


def paired_bootstrap(baseline: ItemScores | ClassificationSamples, other: ItemScores |
                     ClassificationSamples, metric: str, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(delta, low, high): `other` minus `baseline` on `metric`, and the 95% paired-bootstrap interval of that delta.

    Paired: each resample draws the same queries (or test texts) for both models, so what varies is the sample of
    queries, and a difference that a few easy queries carry shows a wide interval.
    """
    if baseline.size != other.size:
        raise ValueError(f"paired bootstrap needs the same queries on both sides, got {baseline.size} and {other.size}")
    everything = np.arange(baseline.size)
    delta = other.statistic(metric, everything) - baseline.statistic(metric, everything)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for index in range(resamples):
        chosen = rng.integers(0, baseline.size, baseline.size)
        draws[index] = other.statistic(metric, chosen) - baseline.statistic(metric, chosen)
    low, high = np.percentile(draws, [2.5, 97.5])
    return delta, float(low), float(high)


def add_deltas(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Rows without their samples; each row of another model than `baseline` gains `delta`: per metric, the difference
    to the baseline's row of the same task, dimension and precision, with its 95% interval and whether the interval
    separates it from zero."""
    by_cell = {(row["task"], row["dimension"], row["precision"]): row for row in rows if row["model"] == baseline}
    finished = []
    for row in rows:
        samples = row.get(SAMPLES)
        clean = {key: value for key, value in row.items() if key != SAMPLES}
        base = by_cell.get((row["task"], row["dimension"], row["precision"]))
        if row["model"] != baseline and base is not None and samples is not None:
            clean["delta"] = {}
            for metric in row["metrics"]:
                delta, low, high = paired_bootstrap(base[SAMPLES], samples, metric)
                clean["delta"][metric] = {"value": delta, "ci95": [low, high], "separated": low > 0 or high < 0}
        finished.append(clean)
    return finished


# --- side by side -----------------------------------------------------------------------------------------------------


def _row(task: str, kind: str, model: str, dimension: int, precision: str, metrics: dict[str, float]) -> dict:
    return {"task": task, "kind": kind, "model": model, "dimension": dimension, "precision": precision,
            "metrics": metrics}


def _check_inputs(models: Mapping[str, Embedder], tasks: Sequence[EvalTask], dims: Sequence[int]) -> list[int]:
    if not models:
        raise ValueError("no models to evaluate")
    if not tasks:
        raise ValueError("no tasks to evaluate")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique (they key the report), got {names}")
    if not dims or any(int(dim) < 1 for dim in dims):
        raise ValueError(f"dims must be positive integers, got {list(dims)}")
    # Largest first: the full dimension heads every table.
    return sorted({int(dim) for dim in dims}, reverse=True)


def evaluate_models(models: dict[str, Embedder], tasks: Sequence[EvalTask], dims: Sequence[int], output_dir: str,
                    int8: bool = True, *, show_progress: bool = True) -> dict[str, Any]:
    """Evaluate every model on every task at every dimension (float32, and int8 when `int8`), side by side.

    The first model is the baseline the report's deltas are taken against. A dimension above a model's native one is
    skipped for that model (listed under "skipped"). Writes report.json, report.md and report.png to `output_dir`
    and returns the report dict (the content of report.json).
    """
    from embedder.report import write_report

    dims = _check_inputs(models, tasks, dims)
    cache = EncodingCache(show_progress)
    rows: list[dict[str, Any]] = []
    task_info: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    seconds: dict[str, dict[str, float]] = {name: {} for name in models}
    started = time.perf_counter()
    for task in tasks:
        if isinstance(task, RetrievalTask):
            beir = load_beir(task.data_dir, task.split)
            task_info.append({"name": task.name, "kind": task.kind, "metrics": list(task.metrics),
                              "data_dir": task.data_dir, "split": task.split, "queries": len(beir.query_ids),
                              "passages": len(beir.corpus_ids),
                              "judgements": sum(len(judged) for judged in beir.qrels.values()),
                              "unknown_corpus_ids": beir.unknown_corpus_ids})
        elif isinstance(task, ClassificationTask):
            train = load_labeled(task.train_path, task.text_field, task.label_field, task.max_train, task.seed)
            test = load_labeled(task.test_path, task.text_field, task.label_field, task.max_test, task.seed)
            task_info.append({"name": task.name, "kind": task.kind, "metrics": list(task.metrics),
                              "train_path": task.train_path, "test_path": task.test_path,
                              "train": len(train.texts), "train_total": train.total, "test": len(test.texts),
                              "test_total": test.total, "labels": len(set(train.labels) | set(test.labels)),
                              "seed": task.seed})
        else:
            raise TypeError(f"unknown task type {type(task).__name__}: expected RetrievalTask or ClassificationTask")
        for model_name, embedder in models.items():
            model_dims = [dim for dim in dims if dim <= embedder.native_dimension]
            skipped += [{"task": task.name, "model": model_name, "dimension": dim,
                         "reason": f"above the model's native dimension {embedder.native_dimension}"}
                        for dim in dims if dim > embedder.native_dimension]
            if not model_dims:
                continue
            task_started = time.perf_counter()
            if isinstance(task, RetrievalTask):
                rows += evaluate_retrieval(model_name, embedder, beir, model_dims, int8, cache, task.name)
            else:
                rows += evaluate_classification(model_name, embedder, train, test, model_dims, int8, cache,
                                                task.name, task.seed)
            seconds[model_name][task.name] = round(time.perf_counter() - task_started, 3)
    baseline = next(iter(models))
    report = {
        "report_version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "baseline": baseline,
        # The window (tokens read per text) is part of what is compared: a model reading more of each passage can win
        # by that alone, so it is stated per model (None: the backend has no window to set, e.g. an API model).
        "models": {name: {"model_id": embedder.model_id, "model_version": embedder.model_version,
                          "native_dimension": embedder.native_dimension,
                          "max_seq_length": getattr(embedder, "max_seq_length", None)}
                   for name, embedder in models.items()},
        "dims": dims,
        "precisions": list(PRECISIONS if int8 else PRECISIONS[:1]),
        "int8_scheme": "symmetric per-dimension scale = max |x| / 127 on the corpus (classification: train) "
                       "embeddings; queries/test clipped to that range; scores on dequantized vectors",
        "tasks": task_info,
        "results": add_deltas(rows, baseline),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "interval": "95% paired bootstrap over "
                      "queries (classification: test texts) of each model's difference to the baseline"},
        "skipped": skipped,
        "encoding": {name: {**asdict(stats), "seconds": round(stats.seconds, 3)}
                     for name, stats in cache.stats.items()},
        "seconds": {"total": round(time.perf_counter() - started, 3), "per_model_task": seconds},
    }
    write_report(report, output_dir)
    return report

