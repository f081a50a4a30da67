"""Split a generated run into training data and a held-out BEIR retrieval set.

`embforge run` on the offline default has no labelled benchmark on a fresh machine, so it holds out a fraction of the
generated queries (by a stable hash of the query id, so the split is the same on every re-run), trains on the rest, and
evaluates base vs trained on the held-out queries against every passage of the corpus, sampled for generation or not
(`evaluate.holdout_corpus = "corpus"`; "run" searches only the sampled ones). Against the sample alone a query has few
distractors and the base model already finds nearly every passage, so no difference can show. Where real data is at
hand, name a BEIR folder in `evaluate.retrieval` as well.

Everything goes through Beam filesystems (the run may live on gs://), and the split is written aside and swapped in
(pipelines/outputs.py), so a failed split never leaves half of one.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from data_schemas import CLASSIFICATION_EXAMPLE, PASSAGE, TRIPLET
from pipelines.outputs import promote, remove_tree
from pipelines.run_layout import read_kind, write_table
from pipelines.stages.corpus_files import plan_corpus
from pipelines.stages.read_corpus import ReadCorpusConfig, read_corpus_file
from pipelines.text_matching import stable_hash

TRAIN_SPLIT = "train_split"
HOLDOUT_EVAL = "holdout_eval"


@dataclass(frozen=True)
class HoldoutSplit:
    train_dir: str
    eval_dir: str
    train_triplets: int
    train_classification: int
    eval_queries: int


def is_held_out(query_id: str, fraction: float, seed: int) -> bool:
    return stable_hash(seed, query_id) % 10_000 < fraction * 10_000


def _write_lines(path: str, lines: list[str]) -> None:
    with FileSystems.create(path) as handle:
        handle.write("".join(line + "\n" for line in lines).encode("utf-8"))


def corpus_passages(config: ReadCorpusConfig) -> list[dict[str, Any]]:
    """Every unique passage of the corpus `config` names, sample or not: the first occurrence of each id (files by
    path, rows in file order, as ReadCorpus keeps them). Read in this process: meant for corpora one machine can
    embed for evaluation."""
    passages: dict[str, dict[str, Any]] = {}
    for corpus_file in sorted(plan_corpus(config.path, config.format), key=lambda item: item.path):
        for outcome in read_corpus_file(corpus_file, config):
            if outcome.passage is not None:
                passages.setdefault(outcome.passage["passage_id"], outcome.passage)
    return list(passages.values())


def split_run(run_dir: str, fraction: float = 0.2, seed: int = 0,
              corpus: Iterable[dict[str, Any]] | None = None) -> HoldoutSplit:
    """Write `<run>/train_split/` (triplets not held out, every classification example) and `<run>/holdout_eval/`
    (corpus.jsonl of `corpus`, by default the run's passages; queries.jsonl and qrels/test.tsv of the held-out
    queries)."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    triplets = read_kind(run_dir, "triplets", TRIPLET)
    passages = read_kind(run_dir, "passages", PASSAGE).to_pylist() if corpus is None else list(corpus)
    classification = read_kind(run_dir, "classification", CLASSIFICATION_EXAMPLE)
    held = pa.array([is_held_out(query_id, fraction, seed) for query_id in triplets.column("query_id").to_pylist()],
                    type=pa.bool_())
    train, held_out = triplets.filter(pc.invert(held)), triplets.filter(held)

    staging = posixpath.join(run_dir, ".split.staging")
    remove_tree(staging)
    write_table(train, posixpath.join(staging, TRAIN_SPLIT, "triplets", "part-00000-of-00001.parquet"))
    if classification.num_rows:
        # Classification examples have no queries to hold out: all of them train (the counterfactuals included).
        write_table(classification, posixpath.join(staging, TRAIN_SPLIT, "classification",
                                                   "part-00000-of-00001.parquet"))
    _write_lines(posixpath.join(staging, HOLDOUT_EVAL, "corpus.jsonl"), [
        json.dumps({"_id": row["passage_id"], "title": row["title"] or "", "text": row["text"]}, ensure_ascii=False)
        for row in passages])
    _write_lines(posixpath.join(staging, HOLDOUT_EVAL, "queries.jsonl"), [
        json.dumps({"_id": row["query_id"], "text": row["query"]}, ensure_ascii=False)
        for row in held_out.to_pylist()])
    _write_lines(posixpath.join(staging, HOLDOUT_EVAL, "qrels", "test.tsv"), [
        "query-id\tcorpus-id\tscore", *(f"{row['query_id']}\t{row['positive_id']}\t1" for row in held_out.to_pylist())])
    promote(staging, run_dir, (TRAIN_SPLIT, HOLDOUT_EVAL))
    return HoldoutSplit(posixpath.join(run_dir, TRAIN_SPLIT), posixpath.join(run_dir, HOLDOUT_EVAL), train.num_rows,
                        classification.num_rows, held_out.num_rows)
