"""Approximate mining search (`generate.mining.index`) vs exact search on real embeddings: recall@k of the search and
overlap of the negatives the mining chooses (issue #15 item 5).

Data: the SciFact corpus (5,183 passages, read as `embforge generate` reads it) embedded by the offline teacher
(packaged all-mpnet-base-v2, 768-d, RETRIEVAL_DOCUMENT), and as queries the corpus's own generated queries: the pairs of
an `embforge generate` run over SciFact (by default the 1,000-passage run of `benchmarks/quality_scifact.py`), embedded
as RETRIEVAL_QUERY. No SciFact query or judgement is read.

For each index (faiss factory string + nprobe / efSearch) each query's top-k comes from the shard search the mining
stage uses (`pipelines.sharded_search.search_shard` over one shard built with those settings: fetched approximately,
rescored exactly), and its negatives from the stage's own selection (`select_candidates` + `mine_without_llm`: the
positive and its text duplicates dropped, NV-Retriever's 0.95 positive-aware threshold, the 7 hardest kept). Figures
per index: recall@10 and recall@k of the top-k against the exact top-k, the share of the exact negatives the
approximate mining chose too, the share of queries with the same negatives in the same order, index build time and
search time for all queries (one thread each, so the times compare; the exact search is `IndexFlatIP`).

The vectors are kept in the work dir (`--work-dir`), so a second run skips the embedding (about 10 minutes on 2 cores
at the default 128-token window, `--max-tokens`).

    python benchmarks/ann_recall.py                       # data: $EMBFORGE_SHARED_DATA or ../shared/data
    python benchmarks/ann_recall.py --pairs RUN/pairs     # queries of another generate run
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root

from quality_runs import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script in it runs)

from tests.shared_data import data_set_folder  # noqa: E402

#: Index factory string, nprobe, efSearch. SciFact's 5,183 passages train at most ~80 IVF lists well (faiss wants
#: 39 training vectors a list), so IVF64 stands in for the IVF4096 of a corpus of millions; PQ48 and SQ8 compress the
#: stored vectors (768 / 48 = 16 dimensions per sub-quantizer).
INDEXES: list[tuple[str, int | None, int | None]] = [
    ("IVF64,Flat", 1, None), ("IVF64,Flat", 4, None), ("IVF64,Flat", 16, None),
    ("HNSW32,Flat", None, 16), ("HNSW32,Flat", None, 64), ("HNSW32,Flat", None, 256),
    ("IVF64,PQ48", 16, None), ("IVF64,SQ8", 16, None),
]


def _embedded(work_dir: Path, name: str, texts: list[str], task_type: Any, max_tokens: int) -> np.ndarray:
    """`texts` embedded by the offline teacher, kept in `work_dir/<name>.npy`: a rerun with the same texts (by digest)
    reuses them."""
    from pipelines.clients.factory import build_embedder
    from pipelines.clients.specs import EmbedderSpec

    path, digest_path = work_dir / f"{name}.npy", work_dir / f"{name}.sha256"
    digest = hashlib.sha256("\0".join([str(max_tokens), *texts]).encode()).hexdigest()
    if path.exists() and digest_path.exists() and digest_path.read_text() == digest:
        return np.load(path)
    embedder = build_embedder(EmbedderSpec(backend="local", max_seq_length=max_tokens))
    blocks, started = [], time.perf_counter()
    for start in range(0, len(texts), 256):
        blocks.append(np.asarray(embedder.embed(texts[start:start + 256], task_type), dtype=np.float32))
        done = start + len(blocks[-1])
        print(f"  {name}: {done:,} / {len(texts):,} embedded ({time.perf_counter() - started:.0f} s)", flush=True)
    vectors = np.concatenate(blocks)
    np.save(path, vectors)
    digest_path.write_text(digest)
    return vectors


def _queries(pairs: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    paths = sorted(glob.glob(os.path.join(pairs, "*.parquet")))
    rows = [row for path in paths for row in pq.read_table(path).to_pylist()]
    if not rows:
        raise SystemExit(f"no pairs in {pairs}: give --pairs, the pairs/ folder of an `embforge generate` run over "
                         "SciFact's corpus")
    return rows


def _mine(queries: list[dict[str, Any]], query_vectors: np.ndarray, hits: list[list[Any]],
          passages: dict[str, dict[str, Any]], vectors_by_id: dict[str, np.ndarray]) -> list[tuple[str, ...] | None]:
    """The negatives the mining stage would choose from each query's hits (None: the query is rejected)."""
    from pipelines.sharded_search import teacher_score
    from pipelines.stages.mine_negatives import (
        Candidate,
        MineNegativesConfig,
        mine_without_llm,
        select_candidates,
    )

    config = MineNegativesConfig(teacher_model="packaged:all-mpnet-base-v2", keep_embeddings=False)
    chosen = []
    for row, query_vector, query_hits in zip(queries, query_vectors, hits, strict=True):
        candidates = [Candidate(hit.passage_id, passages[hit.passage_id]["text"], hit.score, None)
                      for hit in query_hits]
        positive_score = teacher_score(query_vector, vectors_by_id[row["passage_id"]])
        selection = select_candidates(row["passage_id"], row["passage"], positive_score, candidates, config)
        outcome = mine_without_llm(row, selection, config)
        chosen.append(None if outcome.triplet is None else tuple(outcome.triplet["negative_ids"]))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="SciFact in BEIR format (default: scifact in the shared data folder)")
    parser.add_argument("--pairs", default="/tmp/quality_scifact/runs/full-1000/pairs",
                        help="pairs/ of an `embforge generate` run over SciFact's corpus: the queries")
    parser.add_argument("--work-dir", default="/tmp/ann_recall", help="keeps the embedded vectors between runs")
    parser.add_argument("--k", type=int, default=32, help="hits per query (the mining stage's default k)")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="the teacher's window: 128 embeds the corpus in ~10 min on 2 cores (384, the model's own, "
                             "takes an hour); the index's recall depends on the vectors' geometry, which a shorter "
                             "window keeps real")
    args = parser.parse_args()

    import faiss

    from pipelines.clients.base import TaskType
    from pipelines.config import GenerateConfig
    from pipelines.dry_run import read_passages
    from pipelines.sharded_search import IndexSettings, build_shard_index, search_shard
    from pipelines.stages.read_corpus import ReadCorpusConfig

    started = time.perf_counter()
    load_before = os.getloadavg()
    data = data_set_folder(parser, args.data, "scifact")
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    passages, _ = read_passages(GenerateConfig(corpus=ReadCorpusConfig(path=os.path.join(data, "corpus.jsonl"))))
    queries = _queries(args.pairs)
    print(f"{len(passages):,} passages, {len(queries):,} generated queries from {args.pairs}; load average before "
          f"{', '.join(f'{x:.2f}' for x in load_before)}")
    passage_vectors = _embedded(work_dir, "passages", [p["text"] for p in passages], TaskType.RETRIEVAL_DOCUMENT,
                                args.max_tokens)
    query_vectors = _embedded(work_dir, "queries", [q["query"] for q in queries], TaskType.RETRIEVAL_QUERY,
                              args.max_tokens)
    ids = [p["passage_id"] for p in passages]
    by_id = {p["passage_id"]: p for p in passages}
    vectors_by_id = dict(zip(ids, passage_vectors, strict=True))

    # One thread for every index: the times then compare index against index, not how each one parallelizes.
    faiss.omp_set_num_threads(1)
    figures = []
    exact = None
    for factory, nprobe, ef_search in [("Flat", None, None), *INDEXES]:
        settings = IndexSettings(factory, nprobe, ef_search)
        build_start = time.perf_counter()
        shard = build_shard_index(ids, passage_vectors, settings)
        if not settings.exact:
            shard.approximate_index()
        build_s = time.perf_counter() - build_start
        search_start = time.perf_counter()
        hits = search_shard(shard, query_vectors, args.k)
        search_s = time.perf_counter() - search_start
        negatives = _mine(queries, query_vectors, hits, by_id, vectors_by_id)
        if exact is None:
            exact = (hits, negatives)
        exact_hits, exact_negatives = exact
        recall = {cutoff: float(np.mean([
            len({h.passage_id for h in found[:cutoff]} & {h.passage_id for h in truth[:cutoff]}) / len(truth[:cutoff])
            for found, truth in zip(hits, exact_hits, strict=True)])) for cutoff in (10, args.k)}
        both = [(mine, truth) for mine, truth in zip(negatives, exact_negatives, strict=True) if truth]
        overlap = float(np.mean([len(set(mine or ()) & set(truth)) / len(truth) for mine, truth in both]))
        same = float(np.mean([mine == truth for mine, truth in both]))
        figures.append({"index": factory, "nprobe": nprobe, "ef_search": ef_search,
                        "recall_at_10": round(recall[10], 4), f"recall_at_{args.k}": round(recall[args.k], 4),
                        "negatives_overlap": round(overlap, 4), "same_negatives": round(same, 4),
                        "queries_with_negatives": sum(mine is not None for mine in negatives),
                        "build_s": round(build_s, 3), "search_s": round(search_s, 3)})
        row = figures[-1]
        print(f"{factory:<12} nprobe {str(nprobe):>4} efSearch {str(ef_search):>4}  recall@10 {recall[10]:.4f}  "
              f"recall@{args.k} {recall[args.k]:.4f}  negatives overlap {overlap:.4f}  same {same:.4f}  "
              f"build {build_s:.2f} s  search {search_s:.3f} s ({row['search_s'] / figures[0]['search_s']:.2f}x exact)",
              flush=True)
    path = write_results("ann_recall", {
        "passages": len(passages), "queries": len(queries), "dimension": int(passage_vectors.shape[1]),
        "indexes": figures, "load_average_before": list(load_before),
    }, {"data": data, "pairs": args.pairs, "k": args.k, "teacher": "packaged:all-mpnet-base-v2",
        "max_tokens": args.max_tokens, "negatives": 7, "max_negative_score_ratio": 0.95, "faiss_threads": 1},
        started)
    print(f"wrote {path}; load average after {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
