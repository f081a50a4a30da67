"""Classification from a few seeds on Banking77: counterfactual generation -> train MiniLM -> accuracy, base vs trained.

Issue #7 item 6 (classification half). A subset of Banking77's intents (the first --labels of `categories.json`, to fit
2 CPU cores) gets a task spec whose label descriptions are the intent names in words, and --seeds-per-label seed
examples drawn (seeded) from `train.csv`. `embforge generate` (as `python -m pipelines.cli`) runs the
GenerateCounterfactuals stage on that spec: new examples per label and label-flipping minimal edits of each seed. The
generate command always reads a corpus too; a two-passage sample of the built-in corpus keeps that part negligible, and
the student trains on the classification shards only (`embforge train` on a folder holding just those).

Accuracy comes from `embedder.evaluate.evaluate_models` (logistic regression on embeddings, the CLASSIFICATION task
type) on the test rows of the chosen intents, with two training sets for the classifier:
- `fewshot`: only the seed examples, the situation the method is for (a user with a handful of examples per label);
- `full_train`: every train row of the chosen intents, i.e. how good the embedding is when labels are plentiful.

Resumable like quality_scifact.py: a finished generation run, trained model or report in --work-dir is reused.

    python benchmarks/quality_banking77.py                       # data from $EMBFORGE_SHARED_DATA or ../shared/data
    python benchmarks/quality_banking77.py --labels 77 --seeds-per-label 8 --work-dir /tmp/quality_b77_all
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from quality_scifact import run_cli  # benchmarks/ is on sys.path when this script runs

from embedder.evaluate import ClassificationTask, evaluate_models, find_shared_data
from pipelines.clients.factory import DEFAULT_LOCAL_STUDENT, EmbedderSpec, build_embedder

LOGGER = logging.getLogger("quality_banking77")
REPO_ROOT = Path(__file__).resolve().parents[1]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


def prepare_task(args: argparse.Namespace, work_dir: Path) -> dict[str, Path]:
    """Task spec, seed file and the label-restricted train/test files the classifier is fitted and scored on."""
    data = Path(args.data)
    labels = json.loads((data / "categories.json").read_text())[:args.labels]
    chosen = set(labels)
    train = [{"text": row["text"], "label": row["category"]} for row in read_rows(data / "train.csv")
             if row["category"] in chosen]
    test = [{"text": row["text"], "label": row["category"]} for row in read_rows(data / "test.csv")
            if row["category"] in chosen]
    rng = np.random.default_rng(args.seed)
    seeds = []
    for label in labels:
        rows = [row for row in train if row["label"] == label]
        seeds += [rows[index] for index in sorted(rng.choice(len(rows), args.seeds_per_label, replace=False))]
    paths = {"spec": work_dir / "task.json", "seeds": work_dir / "seeds.csv", "train": work_dir / "train_subset.csv",
             "test": work_dir / "test_subset.csv"}
    write_rows(paths["seeds"], seeds)
    write_rows(paths["train"], train)
    write_rows(paths["test"], test)
    spec = {
        "name": "banking77",
        "description": "Classify the intent of a message a customer sent to an online bank's support",
        # Banking77 ships names only; the name in words is the description the generator and the trainer see.
        "labels": [{"name": label, "description": label.replace("_", " ").capitalize()} for label in labels],
        "seed_examples": {"path": paths["seeds"].name, "text_field": "text", "label_field": "label"},
    }
    paths["spec"].write_text(json.dumps(spec, indent=1))
    LOGGER.info("%d labels, %d seeds, %d train rows, %d test rows", len(labels), len(seeds), len(train), len(test))
    return paths


def generate_and_train(args: argparse.Namespace, work_dir: Path, spec: Path) -> tuple[Path, Path]:
    run_dir = work_dir / "runs" / "counterfactuals"
    if not (run_dir / "manifest.json").exists():
        overrides = [
            f"generate.output={run_dir}", f"generate.cache_dir={work_dir / 'cache'}",
            # The command always reads a corpus; two built-in passages keep the retrieval half negligible.
            "generate.corpus.path=builtin:python-stdlib", "generate.corpus.sample=2",
            f"generate.counterfactuals.task_spec={spec}",
            f"generate.counterfactuals.examples_per_label={args.examples_per_label}",
            f"generate.counterfactuals.counterfactuals_per_seed={args.counterfactuals_per_seed}",
        ]
        run_cli(["generate", *[item for override in overrides for item in ("--set", override)]], "generate", work_dir)
    # Train on the classification examples only (not on the two built-in passages' triplets).
    train_data = work_dir / "runs" / "classification_only"
    if train_data.exists():
        shutil.rmtree(train_data)
    (train_data / "classification").mkdir(parents=True)
    for path in glob.glob(str(run_dir / "classification" / "*.parquet")):
        shutil.copy(path, train_data / "classification")
    shutil.copy(run_dir / "manifest.json", train_data / "manifest.json")

    model_dir = work_dir / "models" / "trained"
    if not (model_dir / "train_summary.json").exists():
        if model_dir.exists():  # an interrupted run: its checkpoints would make `train` refuse the directory
            shutil.rmtree(model_dir)
        overrides = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.max_seq_length=64",
                     "train.checkpoint_every=0", "train.progress=false", f"train.seed={args.seed}"]
        run_cli(["train", "--data", str(train_data), "--output", str(model_dir),
                 *[item for override in overrides for item in ("--set", override)]], "train", work_dir)
    return model_dir / "model", run_dir


def classification_counts(run_dir: Path) -> dict[str, int]:
    """Kept classification rows by origin (seed, generated, counterfactual)."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for path in glob.glob(str(run_dir / "classification" / "*.parquet")):
        for origin in pq.read_table(path, columns=["origin"]).column("origin").to_pylist():
            counts[origin] = counts.get(origin, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Banking77 folder (train.csv, test.csv, categories.json)")
    parser.add_argument("--work-dir", default="/tmp/quality_banking77")
    parser.add_argument("--labels", type=int, default=10, help="the first N intents of categories.json")
    parser.add_argument("--seeds-per-label", type=int, default=4)
    # Off by default: the run in RESULTS.md predates LocalLLM decoding the example_generation answer (fixed since),
    # and the 135M model's counterfactuals were already mostly label noise. Raise it with a capable LLM backend.
    parser.add_argument("--examples-per-label", type=int, default=0)
    parser.add_argument("--counterfactuals-per-seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if args.data is None:
        shared = find_shared_data()
        if shared is None:
            parser.error("no shared data folder: pass --data or set EMBFORGE_SHARED_DATA")
        args.data = str(shared / "banking77")
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    paths = prepare_task(args, work_dir)
    model_dir, run_dir = generate_and_train(args, work_dir, paths["spec"])
    report_path = work_dir / "eval" / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        models = {"base": build_embedder(EmbedderSpec(backend="local", model=DEFAULT_LOCAL_STUDENT)),
                  "trained": build_embedder(EmbedderSpec(backend="local", model=str(model_dir)))}
        tasks = [ClassificationTask("fewshot", str(paths["seeds"]), str(paths["test"]), seed=args.seed),
                 ClassificationTask("full_train", str(paths["train"]), str(paths["test"]), seed=args.seed)]
        report = evaluate_models(models, tasks, [384], str(report_path.parent), int8=False, show_progress=False)

    counts = classification_counts(run_dir)
    print(f"\nBanking77, first {args.labels} intents, {args.seeds_per_label} seeds per intent; kept rows by origin: "
          f"{json.dumps(counts)}; {os.cpu_count()} CPUs ({platform.machine()})")
    print(f"{'classifier trained on':<22} {'task rows':>9} {'base acc':>9} {'trained acc':>11} {'delta':>7} "
          f"{'base F1':>8} {'trained F1':>10}")
    figures = {}
    for task in report["tasks"]:
        metrics = {row["model"]: row["metrics"] for row in report["results"]
                   if row["task"] == task["name"] and row["dimension"] == 384 and row["precision"] == "float32"}
        base, trained = metrics["base"], metrics["trained"]
        figures[task["name"]] = {"train_rows": task["train"], "test_rows": task["test"], "base": base,
                                 "trained": trained}
        print(f"{task['name']:<22} {task['train']:>9} {base['accuracy']:>9.4f} {trained['accuracy']:>11.4f} "
              f"{trained['accuracy'] - base['accuracy']:>+7.4f} {base['macro_f1']:>8.4f} {trained['macro_f1']:>10.4f}")
    (work_dir / "results.json").write_text(json.dumps({"args": vars(args), "generated": counts, "results": figures},
                                                      indent=1))
    print(f"wall time {time.perf_counter() - started:.0f} s; results: {work_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
