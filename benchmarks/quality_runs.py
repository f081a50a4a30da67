"""Steps the quality benchmarks share: run an `embforge` command as a user would, score a model per query or per test
text (so differences get paired-bootstrap intervals), and write `benchmarks/results/<name>.json`.

Every step keeps what it finished under the benchmark's work directory and reuses it when run again, so a long run can
be interrupted and resumed; delete the work directory to start over.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root

from embedder.eval_data import LabeledData, load_beir  # noqa: E402  (after the path fix-up above)
from embedder.evaluate import SAMPLES, EncodingCache, evaluate_retrieval, predict_labels  # noqa: E402
from embedder.metrics import BOOTSTRAP_RESAMPLES, ClassificationSamples, ItemScores, paired_bootstrap  # noqa: E402
from pipelines.clients.base import TaskType  # noqa: E402
from pipelines.config import EvaluateConfig  # noqa: E402
from pipelines.run import evaluated_embedder  # noqa: E402

LOGGER = logging.getLogger("benchmarks")
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
#: The window `embforge evaluate` gives every model by default; the benchmarks evaluate the way the product does.
EVAL_WINDOW = EvaluateConfig().max_seq_length


def run_cli(arguments: Sequence[str], log_name: str, work_dir: Path) -> None:
    """One `embforge` command in a child process (the real CLI, as a user runs it), its output in a log file."""
    log_path = work_dir / "logs" / f"{log_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pipelines.cli", *arguments]
    LOGGER.info("running %s (log: %s)", " ".join(command), log_path)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        finished = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if finished.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{arguments[0]} failed with status {finished.returncode}; end of {log_path}:\n{tail}")
    LOGGER.info("%s done in %.0f s", log_name, time.perf_counter() - started)


def settings_arguments(overrides: Sequence[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


def add_generation_options(parser: Any) -> None:
    """`--generate-set`: config overrides for every `embforge generate` of the benchmark, e.g. a capable LLM served
    by vLLM on a GPU (`--generate-set generate.llm.backend=openai --generate-set generate.llm.base_url=...`)."""
    parser.add_argument("--generate-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every generate run (e.g. another LLM backend); a work dir holds the "
                             "runs of one set of overrides only")
    parser.add_argument("--results-name", help="benchmarks/results/<name>.json and .png (default: the benchmark's "
                                               "name); name runs with other overrides apart")


def check_generation_settings(work_dir: Path, overrides: Sequence[str]) -> None:
    """A work dir reuses its finished runs, so it must not mix runs generated with different overrides: the first
    run records them, later runs must match."""
    path = work_dir / "generate_overrides.json"
    if not path.exists():
        path.write_text(json.dumps(sorted(overrides)) + "\n")
        return
    recorded = json.loads(path.read_text())
    if recorded != sorted(overrides):
        raise SystemExit(f"{work_dir} holds runs generated with --generate-set {recorded}, not {sorted(overrides)}: "
                         "give another --work-dir")


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def write_results(name: str, figures: dict[str, Any], settings: dict[str, Any], started: float) -> Path:
    """`benchmarks/results/<name>.json`: the figures with their settings, date, machine and load average."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine(), "load_average_at_end": list(os.getloadavg()),
                "wall_seconds": round(time.perf_counter() - started, 1), "settings": settings, **figures}
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


# --- scores per query, kept on disk ----------------------------------------------------------------------------------


def retrieval_scores(work_dir: Path, name: str, model: str, beir_dir: str, split: str = "test") -> ItemScores:
    """`model`'s retrieval metrics per judged query of `beir_dir` at full dimension, float32, read at the window and
    by the loader `embforge evaluate` uses (quantized folders too); computed once and kept in
    `<work_dir>/scores/<name>.json`."""
    path = work_dir / "scores" / f"{name}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return ItemScores({metric: np.asarray(values) for metric, values in stored["per_query"].items()})
    started = time.perf_counter()
    embedder = evaluated_embedder(model, EVAL_WINDOW)
    data = load_beir(beir_dir, split)
    row = evaluate_retrieval(name, embedder, data, [embedder.native_dimension], False, EncodingCache(False),
                             task_name=Path(beir_dir).name)[0]
    samples = row[SAMPLES]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model, "window": EVAL_WINDOW, "metrics": row["metrics"],
                                "query_ids": list(data.query_ids),
                                "per_query": {metric: values.tolist() for metric, values in
                                              samples.per_item.items()}}))
    LOGGER.info("scored %s: nDCG@10 %.4f (%.0f s)", name, row["metrics"]["ndcg@10"], time.perf_counter() - started)
    return samples


def classification_scores(work_dir: Path, name: str, model: str, train: LabeledData, test: LabeledData,
                          seed: int = 0) -> ClassificationSamples:
    """`model`'s predicted label per test text (logistic regression on `train`'s embeddings, the CLASSIFICATION task
    type, at the evaluation window), computed once and kept like `retrieval_scores`."""
    path = work_dir / "scores" / f"{name}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return ClassificationSamples.of(stored["true"], stored["predicted"])
    embedder = evaluated_embedder(model, EVAL_WINDOW)
    cache = EncodingCache(False)
    train_vectors = cache.encode(name, embedder, train.texts, TaskType.CLASSIFICATION, "train")
    test_vectors = cache.encode(name, embedder, test.texts, TaskType.CLASSIFICATION, "test")
    predicted = predict_labels(train_vectors, train.labels, test_vectors, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model, "window": EVAL_WINDOW, "true": list(test.labels),
                                "predicted": predicted}))
    samples = ClassificationSamples.of(test.labels, predicted)
    LOGGER.info("scored %s: accuracy %.4f", name, samples.statistic("accuracy", np.arange(samples.size)))
    return samples


def mean_of_samples(samples: Sequence[ItemScores]) -> ItemScores:
    """Per query, the mean over several trained models (seeds): the sample a seed-averaged difference resamples."""
    metrics = samples[0].per_item
    return ItemScores({metric: np.mean([sample.per_item[metric] for sample in samples], axis=0)
                             for metric in metrics})


def difference(base, other, metric: str) -> dict[str, Any]:
    """`other` minus `base` on `metric` with its 95% paired-bootstrap interval over the queries (or test texts)."""
    everything = np.arange(base.size)
    delta, low, high = paired_bootstrap(base, other, metric)
    return {"value": other.statistic(metric, everything), "delta": delta, "delta_ci95": [low, high],
            "separated": low > 0 or high < 0, "resamples": BOOTSTRAP_RESAMPLES}
