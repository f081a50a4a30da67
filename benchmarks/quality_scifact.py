"""Does embforge's data make a better student? SciFact, from its corpus alone: generate, train MiniLM, evaluate.

Issue #12 item 6. Every step goes through embforge itself: `embforge generate` (the CLI, in a child process) on a
seeded sample of the SciFact corpus with the offline defaults (SmolLM2-135M writes the queries, all-mpnet-base-v2 is
the teacher), `embforge train` on its triplet shards, and the evaluator on SciFact's test split (300 queries) over the
full corpus (5,183 passages), every model read at the window `embforge evaluate` uses. No SciFact query or judgement
is read before evaluation, except by the `few_shot` lever, which shows the LLM at most 8 queries of the *train* split
(never the test split), and the `human_queries` ceiling, which uses train-split claims as the queries; both are
reported apart from the zero-shot figures.

What it measures (each difference to the base model with a 95% paired-bootstrap interval over the 300 queries):
- **headline**: base vs the student trained on `--passages` passages, with `--seeds` training seeds; the mean
  difference over seeds, its interval from the per-query mean over seeds;
- **learning curve**: the same at each of `--curve` passages (one seed): does more data keep helping? Samples are
  nested (the smallest sample keys), so the larger runs reuse the smaller runs' cached LLM answers;
- **ablations** at `--passages`, one seed each: `no_grading` (every generated pair kept), `no_positive_aware`
  (mined negatives not capped at 0.95 x the positive's score), `random_negatives` (each triplet's mined negatives
  replaced by random passages of the run), `no_distillation`, `no_matryoshka`;
- **levers** that could lift the figure: `abstraction` (reject mostly extractive queries), `candidates` (3 candidate
  queries per passage, the least extractive that passes the round trip kept), `margin` (GPL's margin distillation from
  the teacher's scores), `few_shot` (Promptagator: 8 train-split queries as the prompt's examples);
- **ceiling** `human_queries`: the LLM replaced by SciFact's train-split claims, written by people, for the passages
  they cite (benchmarks/train_split_queries.py), everything else unchanged: is it the LLM's queries that limit the
  figure, or the recipe?

Writes benchmarks/results/quality_scifact.json (base_ndcg10, trained_ndcg10_mean, delta_mean, delta_ci95, passages,
the curve, ablations and levers, settings, date, machine, load average) and benchmarks/results/quality_scifact.png.
Resumable: generation runs, trained models and per-query scores under --work-dir are reused
(benchmarks/quality_runs.py).

    python benchmarks/quality_scifact.py          # data from $EMBFORGE_SHARED_DATA or ../shared/data
    python benchmarks/quality_scifact.py --passages 300 --curve 100 --seeds 0 --variants no_grading   # smaller
    python benchmarks/quality_scifact.py --passages 300 --curve --seeds 0 --results-name quality_scifact_variants_300 \
      --attach-to quality_scifact                     # variants at 300 passages, copied beside the 1,000 headline
    python benchmarks/quality_scifact.py --work-dir /tmp/quality_scifact_qwen --results-name quality_scifact_qwen \
      --generate-set generate.llm.backend=openai --generate-set generate.llm.base_url=http://localhost:8000/v1 \
      --generate-set generate.llm.model=Qwen/Qwen2.5-7B-Instruct --generate-set generate.llm.concurrency=64
                                                      # a capable LLM served by vLLM (GPU): what limits the data?
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from quality_runs import (  # benchmarks/ is on sys.path when a script in it runs
    RESULTS_DIR,
    add_generation_options,
    check_generation_settings,
    difference,
    mean_of_samples,
    retrieval_scores,
    run_cli,
    settings_arguments,
    write_results,
)
from train_split_queries import CLAIMS_ENV, train_split, write_train_split_inputs

from data_schemas.records import TRIPLET
from pipelines.clients.specs import DEFAULT_LOCAL_STUDENT
from pipelines.run_layout import read_kind
from pipelines.text_matching import extractive_share
from tests.shared_data import data_set_folder

LOGGER = logging.getLogger("quality_scifact")
#: The issue's goal: the trained student beats the base model by at least 3 nDCG@10 points.
GOAL = 0.03
#: Promptagator's budget of in-domain examples: at most 8 queries the user gives.
FEW_SHOT_EXAMPLES = 8


@dataclass(frozen=True)
class Variant:
    #: Generation run it trains on: "full", another generation variant, or "random_negatives" (derived from "full").
    run: str
    generate: tuple[str, ...] = ()
    train: tuple[str, ...] = ()
    kind: str = "ablation"
    about: str = ""


#: Cheapest first: the training-only variants reuse the headline's run; the last two ask the LLM anew.
VARIANTS: dict[str, Variant] = {
    "no_distillation": Variant("full", train=("train.distillation_weight=0",), about="no embedding distillation"),
    "no_matryoshka": Variant("full", train=("train.matryoshka_dims=[384]",), about="full dimension only"),
    "random_negatives": Variant("random_negatives", about="random passages of the run as negatives"),
    "no_positive_aware": Variant("no_positive_aware", ("generate.mining.max_negative_score_ratio=1.0",),
                                 about="negatives up to the positive's score kept"),
    "no_grading": Variant("no_grading", ("generate.grading.use_roundtrip=false", "generate.grading.use_llm=false"),
                          about="every generated pair kept"),
    "margin": Variant("full", train=("train.margin_distillation_weight=1.0",), kind="lever",
                      about="margin distillation (GPL) from the teacher's scores"),
    "abstraction": Variant("abstraction", ("generate.queries.max_extractive_share=0.5",), kind="lever",
                           about="queries with > 50% of their bigrams from the passage rejected"),
    "candidates": Variant("candidates", ("generate.queries.candidates=3",), kind="lever",
                          about="3 candidates per passage, least extractive passing the round trip kept"),
    "few_shot": Variant("few_shot", kind="few_shot",
                        about=f"{FEW_SHOT_EXAMPLES} SciFact train-split claims as the prompt's examples"),
    "human_queries": Variant("human_queries", kind="ceiling",
                             about="SciFact train-split claims (written by people) as the queries, for the passages "
                                   "they cite: the LLM replaced, the rest of the pipeline unchanged"),
}


def generate_run(args: argparse.Namespace, work_dir: Path, name: str, passages: int, extra: tuple[str, ...]) -> Path:
    run_dir = work_dir / "runs" / f"{name}-{passages}"
    if (run_dir / "manifest.json").exists():
        return run_dir
    overrides = [f"generate.cache_dir={work_dir / 'cache'}", f"generate.corpus.path={args.data}/corpus.jsonl",
                 f"generate.corpus.sample={passages}", *args.generate_set, *extra]
    run_cli(["generate", "--output", str(run_dir), *settings_arguments(overrides)], f"generate-{name}-{passages}",
            work_dir)
    return run_dir


def few_shot_examples(args: argparse.Namespace, work_dir: Path) -> Path:
    """Up to 8 (passage, claim) pairs of SciFact's train split, seeded: the user's own examples for the prompt."""
    path = work_dir / "few_shot_examples.jsonl"
    if path.exists():
        return path
    queries, corpus, judged = train_split(Path(args.data))
    rng = np.random.default_rng(args.seed)
    chosen = [judged[index] for index in sorted(rng.choice(len(judged), FEW_SHOT_EXAMPLES, replace=False))]
    lines = [{"title": corpus[passage_id]["title"], "passage": corpus[passage_id]["text"], "query": queries[query_id],
              "query_type": "claim"} for query_id, passage_id in chosen]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def triplet_rows(run_dir: Path) -> list[dict]:
    return read_kind(str(run_dir), "triplets", TRIPLET).to_pylist()


def write_random_negatives(source: Path, target: Path, seed: int) -> Path:
    """`source`'s triplets, each with its mined negatives replaced by as many random passages of the run (every
    positive and mined negative: the sample the miner searched, less passages that never surfaced). Teacher scores
    are recomputed from the teacher vectors in the rows, so distillation still has targets."""
    if (target / "manifest.json").exists():
        return target
    rows = triplet_rows(source)
    pool: dict[str, tuple[str, list[float]]] = {}
    for row in rows:
        pool[row["positive_id"]] = (row["positive"], row["positive_embedding"])
        for passage_id, text, vector in zip(row["negative_ids"], row["negatives"], row["negative_embeddings"] or [],
                                            strict=False):
            pool[passage_id] = (text, vector)
    pool_ids = sorted(pool)
    rewritten = []
    for row in rows:
        # Seeded per row, so a row's draw depends on neither row order nor other rows.
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(row["triplet_id"].encode()).digest()[:8],
                                                          "little")])
        candidates = [passage_id for passage_id in pool_ids if passage_id != row["positive_id"]]
        chosen = [candidates[i] for i in rng.choice(len(candidates), len(row["negative_ids"]), replace=False)]
        query = np.asarray(row["query_embedding"], dtype=np.float32)
        scores = [float(query @ np.asarray(pool[passage_id][1], dtype=np.float32)) for passage_id in chosen]
        order = sorted(range(len(chosen)), key=lambda index: -scores[index])
        rewritten.append({**row, "negative_ids": [chosen[i] for i in order],
                          "negatives": [pool[chosen[i]][0] for i in order],
                          "negative_teacher_scores": [scores[i] for i in order], "negative_llm_scores": None,
                          "negative_embeddings": [pool[chosen[i]][1] for i in order]})
    (target / "triplets").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rewritten, schema=TRIPLET), target / "triplets" / "part-00000.parquet")
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["derived"] = {"from": str(source), "negatives": "random passages of the run, seeded per triplet"}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return target


def train_model(args: argparse.Namespace, work_dir: Path, name: str, data_dir: Path, seed: int,
                extra: tuple[str, ...]) -> Path:
    model_dir = work_dir / "models" / name
    if (model_dir / "train_summary.json").exists():
        return model_dir / "model"
    overrides = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
                 f"train.max_seq_length={args.train_max_seq_length}", "train.checkpoint_every=0",
                 "train.progress=false", f"train.seed={seed}", *extra]
    run_cli(["train", "--data", str(data_dir), "--output", str(model_dir), *settings_arguments(overrides)],
            f"train-{name}", work_dir)
    return model_dir / "model"


def run_summary(run_dir: Path) -> dict:
    """What generation kept and rejected, per stage, and how hard its triplets are: the evidence for what limits the
    data. `query_extractive_share` is the mean share of a query's word bigrams found in its positive (0: all new
    phrasing); `teacher_margin` the mean of the teacher's positive score less its best negative's (small: hard)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = {stage["stage"]: {"input": stage["input"], "kept": stage["kept"], "reasons": stage["reasons"]}
              for stage in manifest.get("stages", [])}
    rows = triplet_rows(run_dir)
    shares = np.array([extractive_share(row["query"], row["positive"]) for row in rows])
    margins = np.array([row["positive_teacher_score"] - max(row["negative_teacher_scores"]) for row in rows
                        if row["negative_teacher_scores"]])
    return {"triplets": len(rows), "stages": stages,
            "query_extractive_share": float(shares.mean()) if len(rows) else None,
            "queries_over_half_extractive": float((shares > 0.5).mean()) if len(rows) else None,
            "teacher_margin": float(margins.mean()) if len(margins) else None}


def plot(results: dict, path: Path) -> None:
    """Left: the learning curve, or, when there is one size only, each variant against the same-seed model trained with
    the defaults. Right: every model against the base. Green / red: interval clear of zero."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    left_axis, bar_axis = figure.subplots(1, 2, width_ratios=[1, 2])
    curve = results["learning_curve"]
    if len(curve) > 1:
        sizes = [point["passages"] for point in curve]
        errors = np.array([[point["delta"] - point["delta_ci95"][0], point["delta_ci95"][1] - point["delta"]]
                           for point in curve]).T
        left_axis.errorbar(sizes, [point["delta"] for point in curve], yerr=errors, marker="o", capsize=4)
        left_axis.axhline(GOAL, color="tab:green", linestyle=":", label="goal +0.03")
        left_axis.set_xscale("log")
        left_axis.set_xticks(sizes, [str(size) for size in sizes])
        left_axis.minorticks_off()
        left_axis.set_xlabel("passages generated from")
        left_axis.set_ylabel("Δ nDCG@10 vs base (95% CI)")
        left_axis.set_title("learning curve (one seed)")
        left_axis.legend(fontsize=8)
    else:
        against_full = {name: entry["vs_full_same_seed"] for name, entry in results["variants"].items()}
        _bars(left_axis, against_full)
        left_axis.set_ylabel("Δ nDCG@10 vs the defaults, same seed (95% CI)")
        left_axis.set_title(f"each variant vs the defaults ({results['passages']} passages)", fontsize=10)
    seeds = len(results["seeds"])
    bars = {f"defaults ({'mean of seeds' if seeds > 1 else 'one seed'})": results["headline"], **results["variants"]}
    _bars(bar_axis, bars)
    bar_axis.axhline(GOAL, color="tab:green", linestyle=":")
    bar_axis.set_ylabel("Δ nDCG@10 vs base (95% CI)")
    bar_axis.set_title(f"SciFact test, {results['passages']} passages: defaults, ablations, levers, ceiling vs base",
                       fontsize=10)
    figure.savefig(path, dpi=120)


def _bars(axis, entries: dict) -> None:
    names = list(entries)
    values = np.array([entries[name]["delta"] for name in names])
    errors = np.array([[entries[name]["delta"] - entries[name]["delta_ci95"][0],
                        entries[name]["delta_ci95"][1] - entries[name]["delta"]] for name in names]).T
    colours = ["tab:green" if entries[name]["delta_ci95"][0] > 0 else "tab:red" if entries[name]["delta_ci95"][1] < 0
               else "tab:grey" for name in names]
    axis.bar(names, values, yerr=errors, capsize=3, color=colours)
    axis.axhline(0, color="black", linewidth=1)
    axis.tick_params(axis="x", labelrotation=30, labelsize=8)


def attach(target: Path, source: Path, results: dict) -> None:
    """Copy `results`' variants, with the same-scale model they are compared with, into `target`'s figures."""
    document = json.loads(target.read_text())
    same_scale = next(point for point in results["learning_curve"] if point["passages"] == results["passages"])
    document[f"variants_at_{results['passages']}_passages"] = {
        "source": source.name, "date": json.loads(source.read_text())["date"], "seed": results["seeds"][0],
        "base_ndcg10": results["base_ndcg10"], "full_same_seed": same_scale, "variants": results["variants"]}
    target.write_text(json.dumps(document, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="BEIR-format SciFact folder (default: <shared data>/scifact)")
    parser.add_argument("--work-dir", default="/tmp/quality_scifact", help="runs, models, caches and scores")
    parser.add_argument("--passages", type=int, default=1000, help="passages generated from, headline and variants")
    parser.add_argument("--curve", type=int, nargs="*", default=[100, 300], help="smaller sizes of the learning curve")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the headline")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-max-seq-length", type=int, default=128,
                        help="tokens per text while training (a CPU saving; evaluation reads every model at "
                             "`embforge evaluate`'s window)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the few-shot draw and the random negatives")
    parser.add_argument("--attach-to", metavar="NAME",
                        help="when finished, also copy this run's variants into benchmarks/results/NAME.json under "
                             "variants_at_<passages>_passages (variants run at another scale than that file's "
                             "headline, kept beside it)")
    add_generation_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    args.data = data_set_folder(parser, args.data, "scifact")
    args.data = os.path.abspath(args.data)
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    check_generation_settings(work_dir, args.generate_set)
    started = time.perf_counter()

    base = retrieval_scores(work_dir, "base", DEFAULT_LOCAL_STUDENT, args.data)
    runs: dict[str, Path] = {}

    def run_for(name: str, passages: int) -> Path:
        key = f"{name}-{passages}"
        if key not in runs:
            if name == "random_negatives":
                runs[key] = write_random_negatives(run_for("full", passages), work_dir / "runs" / key, args.seed)
            elif name == "human_queries":
                corpus, claims = write_train_split_inputs(Path(args.data), work_dir / "train_split", args.seed)
                os.environ[CLAIMS_ENV] = str(claims)  # read by the generate child's claim_writer
                runs[key] = generate_run(args, work_dir, name, passages, (
                    f"generate.corpus.path={corpus}", "generate.llm.backend=custom",
                    "generate.llm.model=benchmarks.train_split_queries:claim_writer",
                    "generate.queries.query_types=[claim]"))
            elif name == "few_shot":
                examples = few_shot_examples(args, work_dir)
                runs[key] = generate_run(args, work_dir, name, passages, (
                    f"generate.queries.examples={examples}", "generate.queries.query_types=[claim]"))
            else:
                extra = next((variant.generate for variant in VARIANTS.values() if variant.run == name), ())
                runs[key] = generate_run(args, work_dir, name, passages, extra)
        return runs[key]

    def scored(name: str, run: str, passages: int, seed: int, train_extra: tuple[str, ...] = ()):
        model = train_model(args, work_dir, name, run_for(run, passages), seed, train_extra)
        return retrieval_scores(work_dir, name, str(model), args.data)

    base_ndcg = float(base.per_item["ndcg@10"].mean())
    settings = {key: value for key, value in vars(args).items()}
    results: dict = {"passages": args.passages, "seeds": args.seeds, "base_ndcg10": base_ndcg,
                     "learning_curve": [], "variants": {}}

    def save(complete: bool) -> Path:
        """Figures so far: a run stopped part way still leaves what it finished, marked incomplete."""
        name = args.results_name or "quality_scifact"
        return write_results(name, {**results, "complete": complete}, settings, started)

    # Learning curve first, smallest sample first (the nested samples reuse the smaller runs' cached answers, and the
    # first figures come early); the largest size is the headline's first seed.
    seeded: list = []
    for passages in sorted({*args.curve, args.passages}):
        samples = scored(f"full-{passages}-seed{args.seeds[0]}", "full", passages, args.seeds[0])
        if passages == args.passages:
            seeded.append(samples)
        results["learning_curve"].append({"passages": passages, **run_summary(run_for("full", passages)),
                                          **difference(base, samples, "ndcg@10")})
        save(complete=False)

    # Headline: every seed at full size, averaged per query before resampling.
    seeded += [scored(f"full-{args.passages}-seed{seed}", "full", args.passages, seed) for seed in args.seeds[1:]]
    headline = difference(base, mean_of_samples(seeded), "ndcg@10")
    per_seed = [difference(base, samples, "ndcg@10") for samples in seeded]
    results["headline"] = {**headline, "per_seed": per_seed}
    results.update({"trained_ndcg10_mean": headline["value"], "delta_mean": headline["delta"],
                    "delta_ci95": headline["delta_ci95"], "goal_delta": GOAL,
                    "goal_met": headline["delta"] >= GOAL and headline["delta_ci95"][0] > 0})
    save(complete=False)

    # Ablations and levers: one seed each, against the base and against the headline's same-seed model.
    for name in args.variants:
        variant = VARIANTS[name]
        samples = scored(f"{name}-{args.passages}-seed{args.seeds[0]}", variant.run, args.passages, args.seeds[0],
                         variant.train)
        results["variants"][name] = {"kind": variant.kind, "about": variant.about,
                                     **run_summary(run_for(variant.run, args.passages)),
                                     **difference(base, samples, "ndcg@10"),
                                     "vs_full_same_seed": difference(seeded[0], samples, "ndcg@10")}
        save(complete=False)

    path = save(complete=True)
    if args.attach_to:
        attach(RESULTS_DIR / f"{args.attach_to}.json", path, results)
    curve = results["learning_curve"]
    plot(results, RESULTS_DIR / f"{args.results_name or 'quality_scifact'}.png")

    print(f"\nSciFact test (300 queries, 5,183 passages), nDCG@10, each model read at the evaluation window; "
          f"generation from {args.passages} passages; load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':<26} {'triplets':>8} {'nDCG@10':>8} {'Δ vs base':>10}  95% CI")
    print(f"{'base all-MiniLM-L6-v2':<26} {'':>8} {base_ndcg:>8.4f}")

    def line(name: str, entry: dict, triplets: int | str = "") -> None:
        low, high = entry["delta_ci95"]
        print(f"{name:<26} {triplets!s:>8} {entry['value']:>8.4f} {entry['delta']:>+10.4f}  [{low:+.4f}, {high:+.4f}]")

    triplets = curve[-1]["triplets"]
    for seed, entry in zip(args.seeds, per_seed, strict=True):
        line(f"trained, seed {seed}", entry, triplets)
    line(f"trained, mean of {len(args.seeds)} seeds", headline, triplets)
    for point in curve:
        line(f"curve: {point['passages']} passages", point, point["triplets"])
    for name, entry in results["variants"].items():
        line(f"{entry['kind']}: {name}", entry, entry["triplets"])
    verdict = "MET" if results["goal_met"] else "MISSED"
    print(f"goal: +{GOAL:.2f} nDCG@10 with the interval above zero: {verdict} ({headline['delta']:+.4f})")
    print(f"results: {path}; plot: {path.with_suffix('.png')}; wall {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
