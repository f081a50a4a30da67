"""Evaluation metrics by hand: retrieval metrics of known runs, classification statistics against sklearn, and the
paired bootstrap's intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from embedder.metrics import ClassificationSamples, ItemScores, paired_bootstrap, retrieval_metrics


def test_relevant_passage_at_rank_two_gives_half_mrr_and_ndcg_one_over_log2_3():
    metrics = retrieval_metrics({"q": {"a": 1}}, {"q": {"b": 0.9, "a": 0.8, "c": 0.1}})
    assert metrics["mrr@10"] == pytest.approx(0.5)
    assert metrics["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert metrics["recall@100"] == pytest.approx(1.0)


def test_mrr_is_cut_at_rank_ten_and_unretrieved_queries_count_zero():
    # Relevant passage at rank 11: trec_eval's recip_rank alone would give 1/11; MRR@10 must give 0.
    run = {"q1": {f"x{rank:02d}": 1.0 - rank / 100 for rank in range(10)} | {"a": 0.5}}
    metrics = retrieval_metrics({"q1": {"a": 1}, "q2": {"b": 1}}, run)
    assert metrics["mrr@10"] == 0.0
    assert metrics["ndcg@10"] == 0.0
    # q1 finds its passage within 100, q2 was never retrieved: the mean is over both judged queries.
    assert metrics["recall@100"] == pytest.approx(0.5)


def test_paired_bootstrap_separates_a_consistent_gain_and_not_a_lucky_one():
    base = ItemScores({"ndcg@10": np.linspace(0.2, 0.8, 50)})
    steady = ItemScores({"ndcg@10": np.linspace(0.2, 0.8, 50) + 0.05})
    assert paired_bootstrap(base, steady, "ndcg@10") == pytest.approx((0.05, 0.05, 0.05))
    # The same mean gain carried by two queries of fifty: the interval reaches zero.
    lucky_values = np.linspace(0.2, 0.8, 50)
    lucky_values[:2] += 1.25
    delta, low, high = paired_bootstrap(base, ItemScores({"ndcg@10": lucky_values}), "ndcg@10")
    assert delta == pytest.approx(0.05) and low <= 0 < high
    # Seeded: the same interval every time.
    assert paired_bootstrap(base, ItemScores({"ndcg@10": lucky_values}), "ndcg@10") == (delta, low, high)


def test_classification_statistics_match_sklearn_on_the_whole_sample_and_resample_labels_apart():
    from sklearn.metrics import accuracy_score, f1_score

    true = ["a", "a", "b", "b", "c", "c", "c"]
    predicted = ["a", "b", "b", "b", "c", "a", "d"]
    samples = ClassificationSamples.of(true, predicted)
    everything = np.arange(len(true))
    assert samples.statistic("accuracy", everything) == pytest.approx(accuracy_score(true, predicted))
    assert samples.statistic("macro_f1", everything) == pytest.approx(f1_score(true, predicted, average="macro"))
    subset = np.array([0, 0, 2, 3])
    assert samples.statistic("macro_f1", subset) == pytest.approx(
        f1_score([true[i] for i in subset], [predicted[i] for i in subset], average="macro"))
