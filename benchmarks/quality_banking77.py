"""Classification from a few seeds on Banking77: generated examples and counterfactuals -> MiniLM student -> accuracy.

Issue #12 item 7. The first --labels intents of `categories.json` get a task spec whose label descriptions are the
intent names in words, and --seeds-per-label seed examples drawn (seeded) from `train.csv`. `embforge generate` (the
CLI, in a child process, offline defaults: SmolLM2-135M writes, all-mpnet-base-v2 judges the labels) runs
GenerateCounterfactuals on that spec: new examples per label and label-flipping minimal edits of each seed, each
checked by the label judge (`label_mismatch`). The generate command always reads a corpus too; two built-in passages
keep that part negligible, and the student trains on the classification shards only.

Few-shot, as the method is meant: the evaluation's logistic regression is fitted on the seed examples only (what a
user with a handful of examples per label has) and scored on every test row of the chosen intents. The base model and
students trained with --seeds training seeds are compared by accuracy and macro-F1, each difference with a 95%
paired-bootstrap interval over the test texts; the seed-averaged accuracy difference resamples the per-text
correctness averaged over seeds. For reference the same is reported with the classifier fitted on every train row.

Writes benchmarks/results/quality_banking77.json and benchmarks/results/quality_banking77.png. Resumable like
quality_scifact.py (benchmarks/quality_runs.py).

    python benchmarks/quality_banking77.py                   # data from $EMBFORGE_SHARED_DATA or ../shared/data
    python benchmarks/quality_banking77.py --labels 77 --seeds-per-label 8 --work-dir /tmp/quality_b77_all
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from quality_runs import (  # benchmarks/ is on sys.path when a script in it runs
    RESULTS_DIR,
    add_generation_options,
    check_generation_settings,
    classification_scores,
    difference,
    run_cli,
    settings_arguments,
    write_results,
)

from data_schemas import CLASSIFICATION_EXAMPLE
from embedder.eval_data import load_labeled
from embedder.metrics import ClassificationSamples, ItemScores
from pipelines.clients.specs import DEFAULT_LOCAL_STUDENT
from pipelines.run_layout import read_kind, shard_paths
from tests.shared_data import data_set_folder

LOGGER = logging.getLogger("quality_banking77")


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
        # Banking77 ships names only; the name in words is the description the generator, judge and trainer see.
        "labels": [{"name": label, "description": label.replace("_", " ").capitalize()} for label in labels],
        "seed_examples": {"path": paths["seeds"].name, "text_field": "text", "label_field": "label"},
    }
    paths["spec"].write_text(json.dumps(spec, indent=1))
    LOGGER.info("%d labels, %d seeds, %d train rows, %d test rows", len(labels), len(seeds), len(train), len(test))
    return paths


def generate(args: argparse.Namespace, work_dir: Path, spec: Path) -> Path:
    run_dir = work_dir / "runs" / "counterfactuals"
    if not (run_dir / "manifest.json").exists():
        overrides = [
            f"generate.cache_dir={work_dir / 'cache'}",
            # The command always reads a corpus; two built-in passages keep the retrieval half negligible.
            "generate.corpus.path=builtin:python-stdlib", "generate.corpus.sample=2",
            f"generate.counterfactuals.task_spec={spec}",
            f"generate.counterfactuals.examples_per_label={args.examples_per_label}",
            f"generate.counterfactuals.counterfactuals_per_seed={args.counterfactuals_per_seed}",
            *args.generate_set,
        ]
        run_cli(["generate", "--output", str(run_dir), *settings_arguments(overrides)], "generate", work_dir)
    # The student learns from the classification examples only, not from the two built-in passages' triplets.
    train_data = work_dir / "runs" / "classification_only"
    if not train_data.exists():
        (train_data / "classification").mkdir(parents=True)
        for path in shard_paths(str(run_dir), "classification"):
            shutil.copy(path, train_data / "classification")
    return run_dir


def train(args: argparse.Namespace, work_dir: Path, seed: int) -> Path:
    model_dir = work_dir / "models" / f"trained-seed{seed}"
    if not (model_dir / "train_summary.json").exists():
        overrides = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.max_seq_length=64",
                     "train.checkpoint_every=0", "train.progress=false", f"train.seed={seed}"]
        run_cli(["train", "--data", str(work_dir / "runs" / "classification_only"), "--output", str(model_dir),
                 *settings_arguments(overrides)], f"train-seed{seed}", work_dir)
    return model_dir / "model"


def generated_counts(run_dir: Path) -> dict:
    """Kept rows by origin, and the stage's rejection reasons: what the judge and the filters took out."""
    kept: dict[str, int] = {}
    for origin in read_kind(str(run_dir), "classification", CLASSIFICATION_EXAMPLE).column("origin").to_pylist():
        kept[origin] = kept.get(origin, 0) + 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stage = next(stage for stage in manifest["stages"] if stage["stage"] == "generate_counterfactuals")
    return {"kept_by_origin": kept, "rejected": stage["reasons"]}


def correctness(samples: list[ClassificationSamples]) -> ItemScores:
    """Per test text, the share of the models that classify it right: the sample a seed-averaged accuracy
    difference resamples."""
    return ItemScores({"accuracy": np.mean([sample.true == sample.predicted for sample in samples], axis=0)})


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    names, values, errors = [], [], []
    for setting, entry in results.items():
        for label, delta in [(f"{setting}: seed {index}", item) for index, item in enumerate(entry["per_seed"])] + [
                (f"{setting}: mean", entry["mean"])]:
            names.append(label)
            values.append(delta["delta"])
            errors.append([delta["delta"] - delta["delta_ci95"][0], delta["delta_ci95"][1] - delta["delta"]])
    axis.bar(names, values, yerr=np.array(errors).T, capsize=3,
             color=["tab:blue" if "fewshot" in name else "tab:grey" for name in names])
    axis.axhline(0, color="black", linewidth=1)
    axis.set_ylabel("Δ accuracy vs base (95% CI)")
    axis.set_title("Banking77: student trained on seeds + generated examples + counterfactuals", fontsize=10)
    axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Banking77 folder (train.csv, test.csv, categories.json)")
    parser.add_argument("--work-dir", default="/tmp/quality_banking77")
    parser.add_argument("--labels", type=int, default=20, help="the first N intents of categories.json")
    parser.add_argument("--seeds-per-label", type=int, default=8)
    parser.add_argument("--examples-per-label", type=int, default=4)
    parser.add_argument("--counterfactuals-per-seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42, help="seeds the draw of seed examples")
    add_generation_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    args.data = data_set_folder(parser, args.data, "banking77")
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    check_generation_settings(work_dir, args.generate_set)
    started = time.perf_counter()

    paths = prepare_task(args, work_dir)
    run_dir = generate(args, work_dir, paths["spec"])
    models = {"base": DEFAULT_LOCAL_STUDENT, **{f"seed{seed}": str(train(args, work_dir, seed)) for seed in args.seeds}}
    test = load_labeled(str(paths["test"]))
    results = {}
    for setting, train_path in (("fewshot", paths["seeds"]), ("full_train", paths["train"])):
        fitted_on = load_labeled(str(train_path))
        scores = {name: classification_scores(work_dir, f"{setting}-{name}", model, fitted_on, test, args.seed)
                  for name, model in models.items()}
        base = scores.pop("base")
        everything = np.arange(base.size)
        results[setting] = {
            "classifier_train_rows": len(fitted_on.texts),
            "base": {metric: base.statistic(metric, everything) for metric in ("accuracy", "macro_f1")},
            "per_seed": [difference(base, samples, "accuracy") for samples in scores.values()],
            "per_seed_macro_f1": [difference(base, samples, "macro_f1") for samples in scores.values()],
            "mean": difference(correctness([base]), correctness(list(scores.values())), "accuracy"),
        }
    counts = generated_counts(run_dir)
    figures = {"labels": args.labels, "test_rows": len(test.texts), "generated": counts, **results}
    path = write_results(args.results_name or "quality_banking77", figures, vars(args), started)
    plot(results, RESULTS_DIR / f"{args.results_name or 'quality_banking77'}.png")

    print(f"\nBanking77, first {args.labels} intents, {args.seeds_per_label} seeds per intent, {len(test.texts)} test "
          f"rows; kept by origin {json.dumps(counts['kept_by_origin'])}; rejected {json.dumps(counts['rejected'])}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'classifier fitted on':<22} {'model':<14} {'accuracy':>9} {'Δ vs base':>10}  95% CI")
    for setting, entry in results.items():
        print(f"{setting:<22} {'base':<14} {entry['base']['accuracy']:>9.4f}")
        for seed, delta in zip(args.seeds, entry["per_seed"], strict=True):
            low, high = delta["delta_ci95"]
            print(f"{'':<22} {f'seed {seed}':<14} {delta['value']:>9.4f} {delta['delta']:>+10.4f}  "
                  f"[{low:+.4f}, {high:+.4f}]")
        low, high = entry["mean"]["delta_ci95"]
        print(f"{'':<22} {'mean of seeds':<14} {entry['mean']['value']:>9.4f} {entry['mean']['delta']:>+10.4f}  "
              f"[{low:+.4f}, {high:+.4f}]")
    print(f"results: {path}; wall {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
