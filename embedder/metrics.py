"""Metrics of an evaluation, per query or per test text, and the paired bootstrap that puts an interval on a difference.

Pure functions of runs, judgements and labels: no model and no file is involved, so the numbers can be checked by hand.
Retrieval: nDCG@10, MRR@10 and Recall@100 with pytrec_eval. Classification: accuracy and macro-F1. Every difference to
a baseline comes with a 95% paired-bootstrap interval over the queries (test texts for classification): the difference
of a few hundred queries is noisy, and a gain the interval does not separate from zero is not shown to be one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytrec_eval

#: MRR is cut at rank 10, as in MTEB and BEIR.
MRR_CUTOFF = 10

RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "recall@100")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
#: Bootstrap resamples per interval: enough for stable 2.5th / 97.5th percentiles at a few seconds per report.
BOOTSTRAP_RESAMPLES = 2000
#: Seeds the resampling, so a report's intervals are the same on every run.
BOOTSTRAP_SEED = 0


def retrieval_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]) -> dict:
    """nDCG@10, MRR@10 and Recall@100 with pytrec_eval, averaged over every judged query (one without hits counts 0)."""
    return {metric: float(values.mean()) for metric, values in per_query_retrieval_metrics(qrels, run).items()}


def per_query_retrieval_metrics(qrels: Mapping[str, Mapping[str, int]],
                                run: Mapping[str, Mapping[str, float]]) -> dict[str, np.ndarray]:
    """Each metric per judged query, in the qrels' query order (the sample a paired bootstrap resamples).

    trec_eval has no rank cut for reciprocal rank (`recip_rank` looks down the whole run), so MRR@10 is `recip_rank`
    on the run truncated to each query's 10 best passages: a first relevant hit below rank 10 then counts 0.
    """
    qrels = {query: dict(judged) for query, judged in qrels.items()}
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    # trec_eval orders a run by score, so the 10 best by score are the head it would read.
    head = {query: dict(sorted(hits.items(), key=lambda item: -item[1])[:MRR_CUTOFF]) for query, hits in run.items()}
    ranks = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(head)

    def per_query(results: dict[str, dict[str, float]], measure: str) -> np.ndarray:
        return np.array([results.get(query, {}).get(measure, 0.0) for query in qrels], dtype=np.float64)

    return {"ndcg@10": per_query(full, "ndcg_cut_10"), "mrr@10": per_query(ranks, "recip_rank"),
            "recall@100": per_query(full, "recall_100")}



@dataclass(frozen=True)
class ItemScores:
    """A result's metrics per item: per judged query for retrieval (in the qrels' query order), or any per-text score
    (e.g. a classifier's correctness averaged over training seeds)."""

    per_item: Mapping[str, np.ndarray]

    @property
    def size(self) -> int:
        return len(next(iter(self.per_item.values())))

    def statistic(self, metric: str, indices: np.ndarray) -> float:
        return float(self.per_item[metric][indices].mean())


@dataclass(frozen=True)
class ClassificationSamples:
    """One classification result's true and predicted label per test text, as label codes."""

    true: np.ndarray
    predicted: np.ndarray
    labels: int

    @classmethod
    def of(cls, true: Sequence[str], predicted: Sequence[str]) -> ClassificationSamples:
        names = {name: code for code, name in enumerate(sorted(set(true) | set(predicted)))}
        return cls(np.array([names[name] for name in true]), np.array([names[name] for name in predicted]),
                   len(names))

    @property
    def size(self) -> int:
        return len(self.true)

    def statistic(self, metric: str, indices: np.ndarray) -> float:
        true, predicted = self.true[indices], self.predicted[indices]
        if metric == "accuracy":
            return float((true == predicted).mean())
        # Macro-F1 over the labels present in the (resampled) true or predicted labels, as sklearn averages it; a
        # label with no true and no predicted text is not a label of this sample.
        hits = np.bincount(true[true == predicted], minlength=self.labels)
        true_counts = np.bincount(true, minlength=self.labels)
        predicted_counts = np.bincount(predicted, minlength=self.labels)
        present = (true_counts + predicted_counts) > 0
        f1 = 2 * hits[present] / (true_counts[present] + predicted_counts[present])
        return float(f1.mean())


def paired_bootstrap(baseline: ItemScores | ClassificationSamples, other: ItemScores |
                     ClassificationSamples, metric: str, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(delta, low, high): `other` minus `baseline` on `metric`, and the 95% paired-bootstrap interval of that delta.

    Paired: each resample draws the same queries (or test texts) for both models, so what varies is the sample of
    queries, and a difference that a few easy queries carry shows a wide interval.
    """
    if baseline.size != other.size:
        raise ValueError(f"paired bootstrap needs the same queries on both sides, got {baseline.size} and {other.size}")
    everything = np.arange(baseline.size)
    delta = other.statistic(metric, everything) - baseline.statistic(metric, everything)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for index in range(resamples):
        chosen = rng.integers(0, baseline.size, baseline.size)
        draws[index] = other.statistic(metric, chosen) - baseline.statistic(metric, chosen)
    low, high = np.percentile(draws, [2.5, 97.5])
    return delta, float(low), float(high)

