"""Evaluate any `Embedder` on retrieval (BEIR layout) and classification, at Matryoshka dimensions, float32, int8 and
binary output embeddings.

The evaluator sees models only through the `Embedder` interface, so the base student, a trained student, Gemini and
the test fakes are measured by the same code. Each text set is encoded once per model, at the model's full dimension;
every smaller dimension is a truncation of those vectors (re-normalized), never a second encoding.

Retrieval (`RetrievalTask`): the corpus is embedded as RETRIEVAL_DOCUMENT from `title + " " + text` (stripped), the
convention of BEIR's own dense-retrieval models, and the queries judged in `qrels/<split>.tsv` as RETRIEVAL_QUERY.
Exact inner-product search (faiss `IndexFlatIP`) keeps the top 100 passages per query; pytrec_eval scores the run:
nDCG@10, MRR@10 and Recall@100.

Classification (`ClassificationTask`): logistic regression on the train embeddings (CLASSIFICATION task type), accuracy
and macro-F1 on the test embeddings.

int8: each dimension's vectors go through `embedder.quantize.Int8Quantizer`, calibrated on the vectors a deployment
would store (the corpus; the train set for classification). Binary (retrieval only): sign bits and Hamming search,
alone ("binary") and with float rescoring of the top candidates ("binary+rescore"), see `embedder.quantize`.

Two precisions are reported apart: a result row's `precision` is that of the output embeddings (float32, int8,
binary, binary+rescore); the model's `weight_precision` (float32, int8, int4, mixed; None when unknown, e.g. an API
model) is read from the embedder's `weight_precision` and stated per model and per row.

`evaluate_models` compares models side by side and writes report.json, report.md and report.png (see `embedder.report`).
Every difference to the baseline (the first model) comes with a 95% paired-bootstrap interval over the queries (test
texts for classification), see `embedder.metrics`. The report states each model's window (tokens read per text);
`embforge evaluate` gives every model the same one unless told otherwise. The data files are read by
`embedder.eval_data`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar

import faiss
import numpy as np

from embedder.eval_data import BeirData, EvalDataError, LabeledData, load_beir, load_labeled
from embedder.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CLASSIFICATION_METRICS,
    RETRIEVAL_METRICS,
    ClassificationSamples,
    ItemScores,
    paired_bootstrap,
    per_query_retrieval_metrics,
)
from embedder.quantize import BINARY_SCHEME, INT8_SCHEME, RESCORE_FACTOR, Int8Quantizer, binary_search
from pipelines.clients.base import Embedder, TaskType, truncate_and_normalize

LOGGER = logging.getLogger(__name__)

#: 2: per-model window (`max_seq_length`), and each difference to the baseline with its bootstrap interval.
#: 3: weight precision per model and row, binary output embeddings.
REPORT_VERSION = 3
#: Passages kept per query: Recall@100 needs the top 100, and nDCG@10 / MRR@10 read the head of the same list.
TOP_K = 100
#: Texts per `Embedder.embed` call: small enough for the progress bar to move, large enough to keep a backend's own
#: batches (32 for LocalEmbedder, 100 per Gemini request) full.
ENCODE_CHUNK = 256
#: Logistic-regression iterations: lbfgs converges on normalized embeddings in a few hundred; sklearn's default 100
#: stops early (ConvergenceWarning) on 77-class Banking77.
CLASSIFIER_MAX_ITER = 1000
#: Output-embedding precisions, in report order.
PRECISIONS = ("float32", "int8", "binary", "binary+rescore")
#: Key of a result row's per-query (or per-text) outcomes while the report is assembled; never written to report.json.
SAMPLES = "_samples"


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



def weight_precision(embedder: Embedder) -> str | None:
    return getattr(embedder, "weight_precision", None)


def evaluate_retrieval(model_name: str, embedder: Embedder, data: BeirData, dims: Sequence[int], int8: bool,
                       cache: EncodingCache, task_name: str = "retrieval",
                       binary: bool = False) -> list[dict[str, Any]]:
    """Result rows (one per dimension and precision) for one model on one BEIR split."""
    corpus = cache.encode(model_name, embedder, data.corpus_texts, TaskType.RETRIEVAL_DOCUMENT, f"{task_name} corpus")
    queries = cache.encode(model_name, embedder, data.query_texts, TaskType.RETRIEVAL_QUERY, f"{task_name} queries")
    rows = []
    for dimension in dims:
        corpus_d, queries_d = truncate_and_normalize(corpus, dimension), truncate_and_normalize(queries, dimension)
        searches = {"float32": search(corpus_d, queries_d)}
        if int8:
            quantizer = Int8Quantizer.calibrate(corpus_d)
            searches["int8"] = search(quantizer.roundtrip(corpus_d), quantizer.roundtrip(queries_d))
        if binary:
            searches["binary"] = binary_search(corpus_d, queries_d, TOP_K, rescore=False)
            searches["binary+rescore"] = binary_search(corpus_d, queries_d, TOP_K, rescore=True)
        for precision, (scores, indices) in searches.items():
            run = build_run(data.query_ids, data.corpus_ids, scores, indices)
            per_query = per_query_retrieval_metrics(data.qrels, run)
            row = _row(task_name, "retrieval", model_name, dimension, precision,
                       {metric: float(values.mean()) for metric, values in per_query.items()},
                       weight_precision(embedder))
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
                       {metric: samples.statistic(metric, everything) for metric in CLASSIFICATION_METRICS},
                       weight_precision(embedder))
            rows.append({**row, SAMPLES: samples})
    return rows


# --- differences to the baseline --------------------------------------------------------------------------------------


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


def _row(task: str, kind: str, model: str, dimension: int, precision: str, metrics: dict[str, float],
         weights: str | None) -> dict:
    return {"task": task, "kind": kind, "model": model, "dimension": dimension, "precision": precision,
            "weight_precision": weights, "metrics": metrics}


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
                    int8: bool = True, *, binary: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Evaluate every model on every task at every dimension (float32, int8 when `int8`, and for retrieval binary and
    binary+rescore when `binary`), side by side.

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
                rows += evaluate_retrieval(model_name, embedder, beir, model_dims, int8, cache, task.name, binary)
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
                          "max_seq_length": getattr(embedder, "max_seq_length", None),
                          "weight_precision": weight_precision(embedder)}
                   for name, embedder in models.items()},
        "dims": dims,
        "precisions": [precision for precision in PRECISIONS if precision == "float32"
                       or (precision == "int8" and int8) or (precision.startswith("binary") and binary)],
        "int8_scheme": INT8_SCHEME,
        "binary_scheme": BINARY_SCHEME.format(factor=RESCORE_FACTOR),
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

