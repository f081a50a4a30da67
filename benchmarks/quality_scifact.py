"""Unsupervised domain adaptation on SciFact: generate from the corpus, train MiniLM, evaluate on the test queries.

Issue #7 item 6. Every step goes through embforge itself: `embforge generate` (as `python -m pipelines.cli`) on a
seeded sample of the SciFact corpus, `embforge train` on its triplet shards, and `embedder.evaluate.evaluate_models` on
the SciFact test split (300 queries). The base all-MiniLM-L6-v2 is evaluated in the same run with the same settings.
Only passages are used for generation: no SciFact query, test or train, is read before evaluation.

Variants (the ablation table), each a full generate -> train -> evaluate chain that differs from `full` in one thing:

- `full`: round-trip grading (Promptagator), positive-aware mining (0.95 x positive score), distillation, Matryoshka.
- `no_grading`: generate.grading.use_roundtrip=false, use_llm=false (every generated pair is kept).
- `no_positive_aware`: generate.mining.max_negative_score_ratio=1.0 (the largest value the config accepts: only
  candidates scoring above the positive are dropped, instead of those above 0.95 of it).
- `random_negatives`: no config switch exists, so this script rewrites the `full` run's triplets: each keeps its
  query and positive, and gets as many negatives drawn at random from the passages of the run (every positive and
  mined negative, i.e. the sample the miner searched) as the mined list had. Teacher scores are recomputed from the
  teacher embeddings already in the rows, so distillation still has targets.
- `no_distillation`: train.distillation_weight=0.
- `no_matryoshka`: train.matryoshka_dims=[384].

Two evaluation corpora. The headline (base vs `full`) is measured on the full corpus (5,183 passages). The variants
are compared on an "ablation corpus" (--ablation-passages, default 1,000: every passage judged relevant to a test query
plus seeded random others), because each full-corpus evaluation costs about 13 CPU-core minutes of encoding and a
2-core machine cannot afford one per variant; base and `full` are measured on it too, so the ablation table is
self-consistent. Absolute scores there are higher (fewer distractors); the differences are what to read.
--ablation-passages 0 evaluates every model on the full corpus.

Sized for 2 CPU cores by default (40 passages, 1 query each, 3 negatives, three epochs, training at 128 tokens); raise
the flags on a GPU. The trained models are evaluated at the base model's 256-token window (training at 128 tokens only
saves time: the saved model's window is set back to 256 before evaluation), so every row is read the same way.
Resumable: a finished step (a manifest, a trained model, a report.json in --work-dir) is reused, so a re-run after an
interruption only does what is missing; delete --work-dir to start over. The LLM and teacher caches under
--work-dir/cache make the ablations' generation runs cheap (identical prompts and texts are not recomputed).

    python benchmarks/quality_scifact.py                          # data from $EMBFORGE_SHARED_DATA or ../shared/data
    python benchmarks/quality_scifact.py --passages 2000 --queries-per-passage 2 --work-dir /tmp/quality_big
    python benchmarks/quality_scifact.py --variants full no_distillation     # base is always evaluated
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas.records import TRIPLET
from embedder.evaluate import RetrievalTask, evaluate_models, find_shared_data
from pipelines.clients.factory import DEFAULT_LOCAL_STUDENT, EmbedderSpec, build_embedder

LOGGER = logging.getLogger("quality_scifact")
REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_NDCG = 0.649
#: The issue's goal: the trained student beats the base model by at least 3 nDCG@10 points.
GOAL_POINTS = 0.03
#: The base model's window; trained models are evaluated at the same one (see the module docstring).
EVAL_MAX_SEQ_LENGTH = 256

#: variant -> (generation run it trains on, extra `generate` overrides, extra `train` overrides).
VARIANTS: dict[str, tuple[str, list[str], list[str]]] = {
    "full": ("full", [], []),
    "random_negatives": ("random_negatives", [], []),
    "no_distillation": ("full", [], ["train.distillation_weight=0"]),
    "no_grading": ("no_grading", ["generate.grading.use_roundtrip=false", "generate.grading.use_llm=false"], []),
    "no_positive_aware": ("no_positive_aware", ["generate.mining.max_negative_score_ratio=1.0"], []),
    "no_matryoshka": ("full", [], ["train.matryoshka_dims=[384]"]),
}


def run_cli(arguments: list[str], log_name: str, work_dir: Path) -> None:
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
        raise RuntimeError(f"{' '.join(arguments[:1])} failed with status {finished.returncode}; end of {log_path}:\n"
                           f"{tail}")
    LOGGER.info("%s done in %.0f s", log_name, time.perf_counter() - started)


def generation_overrides(args: argparse.Namespace, work_dir: Path, run_name: str) -> list[str]:
    return [
        f"generate.output={work_dir / 'runs' / run_name}",
        f"generate.cache_dir={work_dir / 'cache'}",
        f"generate.corpus.path={args.data}",
        f"generate.corpus.sample={args.passages}",
        f"generate.queries.queries_per_passage={args.queries_per_passage}",
        f"generate.mining.num_negatives={args.num_negatives}",
    ]


def generate_run(args: argparse.Namespace, work_dir: Path, run_name: str, extra: list[str]) -> Path:
    run_dir = work_dir / "runs" / run_name
    if (run_dir / "manifest.json").exists():
        LOGGER.info("reusing generation run %s", run_dir)
        return run_dir
    overrides = generation_overrides(args, work_dir, run_name) + extra
    run_cli(["generate", *[item for override in overrides for item in ("--set", override)]], f"generate-{run_name}",
            work_dir)
    return run_dir


def triplet_tables(run_dir: Path) -> list[pa.Table]:
    return [pq.read_table(path, schema=TRIPLET) for path in sorted(glob.glob(str(run_dir / "triplets" / "*.parquet")))]


def write_random_negatives(source_dir: Path, target_dir: Path, seed: int) -> Path:
    """Copy of `source_dir`'s triplets with each row's mined negatives replaced by random passages of the run."""
    if (target_dir / "manifest.json").exists():
        LOGGER.info("reusing random-negatives run %s", target_dir)
        return target_dir
    rows = [row for table in triplet_tables(source_dir) for row in table.to_pylist()]
    # The pool: every passage the run's triplets name, with its teacher embedding (the same sample the miner searched,
    # less passages that never surfaced, which a random draw would rarely hit anyway).
    pool: dict[str, tuple[str, list[float]]] = {}
    for row in rows:
        pool[row["positive_id"]] = (row["positive"], row["positive_embedding"])
        for passage_id, text, vector in zip(row["negative_ids"], row["negatives"], row["negative_embeddings"] or [],
                                            strict=False):
            pool[passage_id] = (text, vector)
    pool_ids = sorted(pool)
    rewritten = []
    for row in rows:
        # Seeded per row, so the draw does not depend on row order or on other rows.
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(row["triplet_id"].encode()).digest()[:8],
                                                          "little")])
        candidates = [passage_id for passage_id in pool_ids if passage_id != row["positive_id"]]
        chosen = [candidates[index] for index in rng.choice(len(candidates), len(row["negative_ids"]), replace=False)]
        query = np.asarray(row["query_embedding"], dtype=np.float32)
        scores = []
        for passage_id in chosen:
            vector = np.asarray(pool[passage_id][1], dtype=np.float32)
            scores.append(float(query @ vector / (np.linalg.norm(query) * np.linalg.norm(vector))))
        # Hardest first, as the schema documents for mined negatives.
        order = sorted(range(len(chosen)), key=lambda index: -scores[index])
        rewritten.append({**row, "negative_ids": [chosen[i] for i in order],
                          "negatives": [pool[chosen[i]][0] for i in order],
                          "negative_teacher_scores": [scores[i] for i in order], "negative_llm_scores": None,
                          "negative_embeddings": [pool[chosen[i]][1] for i in order]})
    (target_dir / "triplets").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rewritten, schema=TRIPLET), target_dir / "triplets" / "part-00000.parquet")
    manifest = json.loads((source_dir / "manifest.json").read_text())
    manifest["derived"] = {"from": str(source_dir), "negatives": "random passages of the run, seeded per triplet"}
    (target_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    LOGGER.info("wrote %d triplets with random negatives (pool of %d passages) to %s", len(rewritten), len(pool),
                target_dir)
    return target_dir


def train_model(args: argparse.Namespace, work_dir: Path, variant: str, data_dir: Path, extra: list[str]) -> Path:
    model_dir = work_dir / "models" / variant
    if (model_dir / "train_summary.json").exists():
        LOGGER.info("reusing trained model %s", model_dir)
        return model_dir / "model"
    if model_dir.exists():  # an interrupted run: its checkpoints would make `train` refuse the directory
        shutil.rmtree(model_dir)
    overrides = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
                 f"train.max_seq_length={args.train_max_seq_length}", "train.checkpoint_every=0",
                 "train.progress=false", f"train.seed={args.seed}", *extra]
    run_cli(["train", "--data", str(data_dir), "--output", str(model_dir),
             *[item for override in overrides for item in ("--set", override)]], f"train-{variant}", work_dir)
    # `train` saves the final model to <output>/model and writes train_summary.json last.
    return model_dir / "model"


def set_eval_window(model_dir: Path) -> None:
    """Evaluate at the base model's window: training at fewer tokens is a cost saving, not part of the comparison."""
    config_path = model_dir / "sentence_bert_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if config.get("max_seq_length") != EVAL_MAX_SEQ_LENGTH:
        config["max_seq_length"] = EVAL_MAX_SEQ_LENGTH
        config_path.write_text(json.dumps(config, indent=2))


def write_ablation_corpus(data_dir: str, target: Path, size: int, seed: int) -> str:
    """A BEIR folder with SciFact's test queries and qrels over a seeded subset of the corpus: every passage judged
    relevant to a test query, then random others up to `size`. Scores on it are higher than on the full corpus (fewer
    distractors) but rank the models alike at a fifth of the encoding cost; see the module docstring."""
    if (target / "corpus.jsonl").exists():
        return str(target)
    source = Path(data_dir)
    judged = set()
    for line in (source / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        if line.strip():
            judged.add(line.split("\t")[1])
    lines = [line for line in (source / "corpus.jsonl").read_text().splitlines() if line.strip()]
    relevant = [line for line in lines if json.loads(line)["_id"] in judged]
    others = [line for line in lines if json.loads(line)["_id"] not in judged]
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(others), max(0, size - len(relevant)), replace=False))
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    (target / "corpus.jsonl").write_text("\n".join(relevant + [others[index] for index in picked]) + "\n")
    shutil.copy(source / "queries.jsonl", target / "queries.jsonl")
    shutil.copy(source / "qrels" / "test.tsv", target / "qrels" / "test.tsv")
    LOGGER.info("ablation corpus: %d relevant + %d random passages in %s", len(relevant), len(picked), target)
    return str(target)


def evaluate_model(args: argparse.Namespace, work_dir: Path, name: str, model: str, corpus: str = "full") -> dict:
    """nDCG@10 and friends on SciFact test, over the full corpus (`corpus="full"`) or the ablation corpus ("sub");
    one report folder per model and corpus, reused when present."""
    output = work_dir / "eval" / (name if corpus == "full" else f"{name}-sub")
    report_path = output / "report.json"
    wait_for_other_run(output / ".running", report_path)
    if report_path.exists():
        LOGGER.info("reusing evaluation %s", report_path)
        return json.loads(report_path.read_text())
    output.mkdir(parents=True, exist_ok=True)
    (output / ".running").write_text(str(os.getpid()))
    data = args.data if corpus == "full" else args.ablation_data
    embedder = build_embedder(EmbedderSpec(backend="local", model=model))
    started = time.perf_counter()
    report = evaluate_models({name: embedder}, [RetrievalTask(f"scifact-{corpus}", data, "test")], args.dims,
                             str(output), int8=False, show_progress=False)
    LOGGER.info("evaluated %s on the %s corpus in %.0f s", name, corpus, time.perf_counter() - started)
    (output / ".running").unlink(missing_ok=True)
    return report


def wait_for_other_run(lock: Path, report_path: Path) -> None:
    """Wait while another live process (e.g. a second invocation started to use idle cores) writes this report."""
    while lock.exists() and not report_path.exists():
        try:
            os.kill(int(lock.read_text()), 0)
        except (ProcessLookupError, ValueError):
            return  # a run that died: compute the report here
        LOGGER.info("waiting for process %s to finish %s", lock.read_text(), report_path)
        time.sleep(30)


def full_dim_metrics(report: dict) -> dict[str, float]:
    full = max(report["dims"])
    return next(row["metrics"] for row in report["results"]
                if row["dimension"] == full and row["precision"] == "float32")


def plot_ablation(figures: dict[str, float], base: float, path: Path, corpus_words: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    names = list(figures)
    values = [figures[name] for name in names]
    colours = ["tab:green" if value >= base + GOAL_POINTS else "tab:blue" if value >= base else "tab:red"
               for value in values]
    bars = axes.bar(names, values, color=colours)
    axes.bar_label(bars, labels=[f"{value:.3f}" for value in values], fontsize=8)
    axes.axhline(base, color="black", linestyle="--", linewidth=1, label=f"base all-MiniLM-L6-v2 ({base:.3f})")
    axes.axhline(base + GOAL_POINTS, color="tab:green", linestyle=":", linewidth=1, label="goal: base + 0.03")
    low = min([*values, base]) - 0.03
    axes.set_ylim(low, max([*values, base + GOAL_POINTS]) + 0.02)
    axes.set_ylabel("nDCG@10, SciFact test")
    axes.set_title(f"Synthetic-data ablations, MiniLM student, on {corpus_words}", fontsize=10)
    axes.tick_params(axis="x", labelrotation=20, labelsize=8)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def triplet_count(run_dir: Path) -> int:
    return sum(table.num_rows for table in triplet_tables(run_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="BEIR-format SciFact folder (default: <shared data>/scifact)")
    parser.add_argument("--work-dir", default="/tmp/quality_scifact",
                        help="runs, models, caches and reports; finished steps found here are reused")
    parser.add_argument("--passages", type=int, default=40, help="corpus passages sampled for generation")
    parser.add_argument("--queries-per-passage", type=int, default=1)
    parser.add_argument("--num-negatives", type=int, default=3, help="mined negatives per triplet")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-max-seq-length", type=int, default=128)
    parser.add_argument("--dims", type=int, nargs="+", default=[384], help="evaluation dimensions")
    parser.add_argument("--ablation-passages", type=int, default=1000,
                        help="corpus size the variants are compared on (every test-relevant passage plus random "
                             "others); 0 = the full corpus for every model, what a GPU run should use")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to run, in this order (the base model is always evaluated too)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if args.data is None:
        shared = find_shared_data()
        if shared is None:
            parser.error("no shared data folder: pass --data or set EMBFORGE_SHARED_DATA")
        args.data = str(shared / "scifact")
    args.data = os.path.abspath(args.data)
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    full_corpus = args.ablation_passages == 0
    args.ablation_data = args.data if full_corpus else write_ablation_corpus(
        args.data, work_dir / "ablation_corpus", args.ablation_passages, args.seed)
    results: dict[str, dict] = {}
    models: dict[str, str] = {}
    for variant in args.variants:
        run_name, generate_extra, train_extra = VARIANTS[variant]
        variant_started = time.perf_counter()
        try:
            if run_name == "random_negatives":
                full_dir = generate_run(args, work_dir, "full", VARIANTS["full"][1])
                data_dir = write_random_negatives(full_dir, work_dir / "runs" / "random_negatives", args.seed)
            else:
                data_dir = generate_run(args, work_dir, run_name, generate_extra)
            model_dir = train_model(args, work_dir, variant, data_dir, train_extra)
            set_eval_window(model_dir)
            report = evaluate_model(args, work_dir, variant, str(model_dir), "full" if full_corpus else "sub")
        except RuntimeError as error:  # one failed variant must not cost the others' figures
            LOGGER.error("variant %s failed: %s", variant, error)
            continue
        models[variant] = str(model_dir)
        results[variant] = {"ablation": full_dim_metrics(report), "triplets": triplet_count(data_dir)}
        LOGGER.info("variant %s: nDCG@10 %.4f on the ablation corpus (%.0f s)", variant,
                    results[variant]["ablation"]["ndcg@10"], time.perf_counter() - variant_started)
    # The base model after the variants, measured by the same code and settings; then the headline figures (base and
    # full) on the full corpus, which the ablation corpus only stands in for.
    models = {"base": DEFAULT_LOCAL_STUDENT, **models}
    results = {"base": {"triplets": 0}, **results}
    results["base"]["ablation"] = full_dim_metrics(evaluate_model(args, work_dir, "base", DEFAULT_LOCAL_STUDENT,
                                                                  "full" if full_corpus else "sub"))
    for name in ("base", "full"):
        if name in models:
            results[name]["full_corpus"] = full_dim_metrics(evaluate_model(args, work_dir, name, models[name]))

    base = results["base"]["ablation"]["ndcg@10"]
    corpus_words = "the full corpus" if full_corpus else f"the ablation corpus ({args.ablation_passages} passages)"
    print(f"\nSciFact test (300 queries), float32 at {max(args.dims)} dims; generation from {args.passages} sampled "
          f"passages x {args.queries_per_passage} queries; {os.cpu_count()} CPUs ({platform.machine()})")
    print(f"{'model':<18} {'triplets':>8} | on {corpus_words}: {'nDCG@10':>7} {'delta':>7} {'MRR@10':>7} "
          f"{'R@100':>6} | full corpus: {'nDCG@10':>7} {'delta':>7}")
    for name, result in results.items():
        metrics = result["ablation"]
        line = (f"{name:<18} {result['triplets']:>8} | {'':>{len(corpus_words) + 5}}{metrics['ndcg@10']:>7.4f} "
                f"{metrics['ndcg@10'] - base:>+7.4f} {metrics['mrr@10']:>7.4f} {metrics['recall@100']:>6.4f} |")
        if "full_corpus" in result:
            gain = result["full_corpus"]["ndcg@10"] - results["base"]["full_corpus"]["ndcg@10"]
            line += f" {'':>12} {result['full_corpus']['ndcg@10']:>7.4f} {gain:>+7.4f}"
        print(line)
    (work_dir / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    trained = {name: result["ablation"]["ndcg@10"] for name, result in results.items() if name != "base"}
    if trained:
        plot_ablation(trained, base, work_dir / "ablation.png", corpus_words)
        print(f"plot: {work_dir / 'ablation.png'}")
    print(f"wall time {time.perf_counter() - started:.0f} s; results: {work_dir / 'results.json'}")
    if "full_corpus" in results.get("full", {}):
        gain = results["full"]["full_corpus"]["ndcg@10"] - results["base"]["full_corpus"]["ndcg@10"]
        verdict = "MET" if gain >= GOAL_POINTS else "MISSED"
        print(f"goal (full >= base + {GOAL_POINTS:.2f} nDCG@10 on the full corpus): {verdict}, {gain:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
