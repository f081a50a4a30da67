"""Split a generated run into training triplets and a held-out BEIR retrieval set.

`embforge run` on the offline default has no labelled benchmark on a fresh machine, so it holds out a fraction of the
generated queries (by a stable hash of the query id, so the split is the same on every re-run), trains on the rest, and
evaluates base vs trained on the held-out queries against the run's whole corpus. Where real data is at hand, name a
BEIR folder in `evaluate.retrieval` as well.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import PASSAGE, TRIPLET, validate_table
from pipelines.stages import stable_hash


@dataclass(frozen=True)
class HoldoutSplit:
    train_dir: str
    eval_dir: str
    train_triplets: int
    eval_queries: int


def _read_kind(run_dir: str, kind: str, schema: pa.Schema) -> pa.Table:
    paths = sorted(glob.glob(os.path.join(run_dir, kind, "*.parquet")))
    tables = [validate_table(pq.read_table(path), schema, source=path) for path in paths]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def is_held_out(query_id: str, fraction: float, seed: int) -> bool:
    return stable_hash(seed, query_id) % 10_000 < fraction * 10_000


def split_run(run_dir: str, fraction: float = 0.2, seed: int = 0) -> HoldoutSplit:
    """Write `<run>/train_split/triplets/` and `<run>/holdout_eval/` (corpus.jsonl, queries.jsonl, qrels/test.tsv)."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    triplets = _read_kind(run_dir, "triplets", TRIPLET)
    passages = _read_kind(run_dir, "passages", PASSAGE)
    held = [is_held_out(query_id, fraction, seed) for query_id in triplets.column("query_id").to_pylist()]
    mask = pa.array(held, type=pa.bool_())
    train = triplets.filter(pa.compute.invert(mask))
    held_out = triplets.filter(mask)

    train_dir = os.path.join(run_dir, "train_split")
    os.makedirs(os.path.join(train_dir, "triplets"), exist_ok=True)
    pq.write_table(train, os.path.join(train_dir, "triplets", "part-00000-of-00001.parquet"), compression="zstd")

    eval_dir = os.path.join(run_dir, "holdout_eval")
    os.makedirs(os.path.join(eval_dir, "qrels"), exist_ok=True)
    with open(os.path.join(eval_dir, "corpus.jsonl"), "w", encoding="utf-8") as corpus:
        for row in passages.to_pylist():
            corpus.write(json.dumps({"_id": row["passage_id"], "title": row["title"] or "", "text": row["text"]},
                                    ensure_ascii=False) + "\n")
    with open(os.path.join(eval_dir, "queries.jsonl"), "w", encoding="utf-8") as queries, \
            open(os.path.join(eval_dir, "qrels", "test.tsv"), "w", encoding="utf-8") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for row in held_out.to_pylist():
            queries.write(json.dumps({"_id": row["query_id"], "text": row["query"]}, ensure_ascii=False) + "\n")
            qrels.write(f"{row['query_id']}\t{row['positive_id']}\t1\n")
    return HoldoutSplit(train_dir, eval_dir, train.num_rows, held_out.num_rows)
