"""Small evaluation data files for evaluator tests: a toy BEIR folder whose right answers are known under
`KeywordEmbedder` (tests/fakes/backends.py) and under `ConfusedEmbedder`, and labeled CSV files."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.clients.base import TaskType
from tests.fakes.backends import KeywordEmbedder

KEYWORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")
#: d_delta carries its keyword only in the title, so a perfect score also proves the title is embedded.
CORPUS = {
    "d_alpha": ("", "alpha"),
    "d_beta": ("", "beta beta gamma"),
    "d_delta": ("delta", "unrelated words here"),
    "d_epsilon": ("", "epsilon"),
    "d_zeta": ("", "zeta"),
}
QUERIES = {"q_alpha": "alpha", "q_beta": "beta", "q_delta": "delta", "q_epsilon": "epsilon", "q_zeta": "zeta"}
#: q_zeta is judged only in the train split: the test split must neither encode nor score it.
QRELS = {
    "test": [("q_alpha", "d_alpha", 1), ("q_beta", "d_beta", 1), ("q_delta", "d_delta", 1),
             ("q_epsilon", "d_epsilon", 1)],
    "train": [("q_zeta", "d_zeta", 1)],
}


class ConfusedEmbedder(KeywordEmbedder):
    """Reads "beta" as "alpha". Under it d_beta becomes "alpha alpha gamma" (cosine 2/sqrt(5) with "alpha"), so q_beta
    ranks d_alpha (cosine 1) first and its relevant d_beta second: MRR 1/2 and nDCG 1/log2(3) for that query, every
    other query still perfect."""

    model_id = "confused-keyword-embedder"

    def embed(self, texts: Sequence[str], task_type: TaskType, dimension: int | None = None) -> np.ndarray:
        return super().embed([text.replace("beta", "alpha") for text in texts], task_type, dimension)


def write_beir(root: Path, corpus=CORPUS, queries=QUERIES, qrels=QRELS) -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": key, "title": title, "text": text}) + "\n" for key, (title, text) in corpus.items()))
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": key, "text": text}) + "\n" for key, text in queries.items()))
    for split, rows in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows))
    return root


def write_labeled_csv(path: Path, rows: Sequence[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category"])
        writer.writerows(rows)
    return path
