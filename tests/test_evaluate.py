"""Evaluator (issue #4): any `Embedder` on BEIR retrieval and labeled classification, at Matryoshka dimensions, in
float32 and int8, models side by side.

Done when: with `KeywordEmbedder` (right answers known) a perfect model scores 1.0 everywhere, a model that confuses
two keywords scores exactly the hand-computed values, int8 stays within its error bound, the report files hold the
table and the plot, and bad data stops with the file, the line and the field. The real-data checks (SciFact, Banking77
subsets through the same code) are marked `needs_shared_data`; the full SciFact figure is benchmarks/eval_scifact.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from embedder.evaluate import (
    SHARED_DATA_ENV,
    ClassificationSamples,
    ClassificationTask,
    EvalDataError,
    Int8Quantizer,
    ItemScores,
    RetrievalTask,
    evaluate_models,
    find_shared_data,
    load_beir,
    load_labeled,
    paired_bootstrap,
    retrieval_metrics,
)
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


def keyword_model(dimension: int = 32) -> KeywordEmbedder:
    return KeywordEmbedder(KEYWORDS, dimension)


def metrics_of(report: dict, model: str, task: str | None = None) -> dict[tuple[int, str], dict[str, float]]:
    return {(row["dimension"], row["precision"]): row["metrics"] for row in report["results"]
            if row["model"] == model and (task is None or row["task"] == task)}


# --- metrics by hand --------------------------------------------------------------------------------------------------


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


# --- retrieval end to end ---------------------------------------------------------------------------------------------


def test_load_beir_joins_title_and_text_and_keeps_only_judged_queries(tmp_path):
    data = load_beir(str(write_beir(tmp_path)), "test")
    texts = dict(zip(data.corpus_ids, data.corpus_texts, strict=True))
    assert texts["d_delta"] == "delta unrelated words here"
    assert texts["d_alpha"] == "alpha"  # an empty title leaves no leading space
    assert data.query_ids == ("q_alpha", "q_beta", "q_delta", "q_epsilon")
    assert data.qrels["q_beta"] == {"d_beta": 1}


def test_perfect_model_scores_one_at_every_dimension_and_precision(tmp_path):
    report = evaluate_models({"keyword": keyword_model()}, [RetrievalTask("toy", str(write_beir(tmp_path)))],
                             [32, 16, 8], str(tmp_path / "report"), show_progress=False)
    results = metrics_of(report, "keyword")
    assert set(results) == {(dim, precision) for dim in (32, 16, 8) for precision in ("float32", "int8")}
    for metrics in results.values():
        assert metrics == pytest.approx({"ndcg@10": 1.0, "mrr@10": 1.0, "recall@100": 1.0})
    assert report["tasks"][0]["queries"] == 4 and report["tasks"][0]["passages"] == 5


def test_confused_model_scores_the_hand_computed_values(tmp_path):
    report = evaluate_models({"base": keyword_model(), "confused": ConfusedEmbedder(KEYWORDS, 32)},
                             [RetrievalTask("toy", str(write_beir(tmp_path)))], [32, 16], str(tmp_path / "report"),
                             show_progress=False)
    for metrics in metrics_of(report, "confused").values():
        # Three perfect queries and q_beta with its relevant passage at rank 2.
        assert metrics["mrr@10"] == pytest.approx((3 + 1 / 2) / 4)
        assert metrics["ndcg@10"] == pytest.approx((3 + 1 / math.log2(3)) / 4)
        assert metrics["recall@100"] == pytest.approx(1.0)
    assert all(metrics["ndcg@10"] == pytest.approx(1.0) for metrics in metrics_of(report, "base").values())


def test_each_text_set_is_encoded_once_per_model(tmp_path):
    data_dir = str(write_beir(tmp_path))
    model = keyword_model()
    tasks = [RetrievalTask("toy-test", data_dir, "test"), RetrievalTask("toy-train", data_dir, "train")]
    report = evaluate_models({"keyword": model}, tasks, [32, 16], str(tmp_path / "report"), show_progress=False)
    # corpus once (shared by both splits and both dimensions), then each split's judged queries once.
    assert model.stats.calls == 3
    assert report["encoding"]["keyword"]["cache_hits"] == 1
    assert report["encoding"]["keyword"]["texts_encoded"] == 5 + 4 + 1
    assert metrics_of(report, "keyword", "toy-train")[32, "float32"]["ndcg@10"] == pytest.approx(1.0)


def test_dimensions_above_a_models_native_one_are_skipped(tmp_path):
    report = evaluate_models({"wide": keyword_model(32), "narrow": keyword_model(16)},
                             [RetrievalTask("toy", str(write_beir(tmp_path)))], [32, 16], str(tmp_path / "report"),
                             int8=False, show_progress=False)
    assert set(metrics_of(report, "narrow")) == {(16, "float32")}
    assert report["skipped"] == [{"task": "toy", "model": "narrow", "dimension": 32,
                                  "reason": "above the model's native dimension 16"}]
    assert "| ndcg@10 | 32 | float32 | 1.0000 | — | — |" in (tmp_path / "report" / "report.md").read_text()


# --- classification ---------------------------------------------------------------------------------------------------

CLASS_WORDS = {"sport": ("ball", "goal"), "cooking": ("oven", "salt"), "music": ("guitar", "drum")}


def write_labeled_csv(path: Path, rows: Sequence[tuple[str, str]]) -> Path:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category"])
        writer.writerows(rows)
    return path


def separable_rows(count: int, offset: int = 0) -> list[tuple[str, str]]:
    """`count` texts per label, each with one of its label's words plus filler words shared by every label."""
    return [(f"{words[index % 2]} the story number {index + offset}", label)
            for label, words in CLASS_WORDS.items() for index in range(count)]


def test_separable_classification_scores_one(tmp_path):
    vocabulary = [word for words in CLASS_WORDS.values() for word in words]
    train = write_labeled_csv(tmp_path / "train.csv", separable_rows(6))
    test = write_labeled_csv(tmp_path / "test.csv", separable_rows(2, offset=100))
    task = ClassificationTask("toy-intents", str(train), str(test), text_field="text", label_field="category")
    report = evaluate_models({"keyword": KeywordEmbedder(vocabulary, 32)}, [task], [32, 16], str(tmp_path / "report"),
                             show_progress=False)
    results = metrics_of(report, "keyword")
    assert set(results) == {(dim, precision) for dim in (32, 16) for precision in ("float32", "int8")}
    for metrics in results.values():
        assert metrics == pytest.approx({"accuracy": 1.0, "macro_f1": 1.0})
    assert report["tasks"][0]["labels"] == 3


def test_jsonl_labels_may_be_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ball", "label": 3}\n\n{"text": "oven", "label": 7}\n')
    assert load_labeled(str(path)).labels == ("3", "7")


def test_subsample_is_seeded_and_keeps_file_order(tmp_path):
    path = write_labeled_csv(tmp_path / "train.csv", [(f"text {index}", f"label {index % 3}") for index in range(50)])
    first = load_labeled(str(path), label_field="category", max_rows=10, seed=1)
    assert first == load_labeled(str(path), label_field="category", max_rows=10, seed=1)
    assert first != load_labeled(str(path), label_field="category", max_rows=10, seed=2)
    assert len(first.texts) == 10 and first.total == 50
    positions = [int(text.split()[1]) for text in first.texts]
    assert positions == sorted(positions)


# --- int8 -------------------------------------------------------------------------------------------------------------


def test_int8_roundtrip_stays_within_half_a_step_and_bounds_the_score_error():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((500, 64)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:40] + 0.05 * rng.standard_normal((40, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    quantizer = Int8Quantizer.calibrate(corpus)
    codes = quantizer.quantize(corpus)
    assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() == 127  # the peak of each dimension uses +-127
    assert np.all(np.abs(quantizer.roundtrip(corpus) - corpus) <= quantizer.scale / 2 + 1e-7)

    # |x.y - x'.y'| <= sum_j (|x_j| + |y'_j|) * scale_j / 2 for in-range values (queries may clip, so use corpus ones).
    x, y = corpus[:40], corpus[100:140]
    x_hat, y_hat = quantizer.roundtrip(x), quantizer.roundtrip(y)
    error = np.abs(x @ y.T - x_hat @ y_hat.T)
    bound = (np.abs(x) * quantizer.scale / 2).sum(1)[:, None] + (np.abs(y_hat) * quantizer.scale / 2).sum(1)[None, :]
    assert np.all(error <= bound + 1e-6)
    # In practice scores of unit vectors move by a few thousandths, so the nearest passage stays the nearest.
    query_scores, query_scores_int8 = queries @ corpus.T, quantizer.roundtrip(queries) @ quantizer.roundtrip(corpus).T
    assert np.abs(query_scores - query_scores_int8).mean() < 0.005
    assert np.mean(query_scores.argmax(1) == query_scores_int8.argmax(1)) == 1.0


def test_int8_clips_beyond_the_calibrated_range_and_survives_a_zero_dimension():
    corpus = np.array([[0.5, 0.0], [-0.25, 0.0]], dtype=np.float32)
    quantizer = Int8Quantizer.calibrate(corpus)
    assert np.all(np.isfinite(quantizer.scale)) and np.all(quantizer.scale > 0)
    assert quantizer.quantize(np.array([[1.0, 0.0]], dtype=np.float32)).tolist() == [[127, 0]]
    assert quantizer.quantize(corpus).tolist() == [[127, 0], [-64, 0]]  # -0.25 / (0.5 / 127) = -63.5 -> -64


# --- report files -----------------------------------------------------------------------------------------------------


def test_report_json_md_and_png_are_written(tmp_path):
    output = tmp_path / "report"
    report = evaluate_models({"base": keyword_model(), "trained": ConfusedEmbedder(KEYWORDS, 32)},
                             [RetrievalTask("toy", str(write_beir(tmp_path / "beir")))], [32, 16], str(output),
                             show_progress=False)
    assert json.loads((output / "report.json").read_text()) == report
    markdown = (output / "report.md").read_text()
    assert "| metric | dim | precision | base | trained | Δ trained |" in markdown
    # One query of four drops to rank 2: the interval of the difference reaches 0, so it is marked as not separated.
    assert "| mrr@10 | 32 | float32 | 1.0000 | 0.8750 | -0.1250 [-0.3750, +0.0000] † |" in markdown
    delta = next(row for row in report["results"] if row["model"] == "trained")["delta"]["mrr@10"]
    assert delta == {"value": -0.125, "ci95": [-0.375, 0.0], "separated": False}
    assert all("delta" not in row for row in report["results"] if row["model"] == "base")
    assert "| ndcg@10 | 16 | int8 | 1.0000 |" in markdown
    assert "![metrics by dimension](report.png)" in markdown
    assert (output / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["baseline"] == "base"
    assert report["models"]["trained"]["model_id"] == "confused-keyword-embedder"


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


# --- bad data ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq_alpha\td_alpha\t1\nq_beta d_beta 1\n",
         r"qrels/test.tsv line 3: expected 3 tab-separated fields"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq_alpha\td_alpha\tyes\n",
         r'qrels/test.tsv line 2: "score" must be an integer'),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq_alpha\t\t1\n", r'qrels/test.tsv line 2: empty "corpus-id"'),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq_alpha\td_alpha\t1\nq_alpha\td_alpha\t1\n",
         r"qrels/test.tsv line 3: duplicate judgement .* \(first on line 2\)"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq_alpha\td_alpha\t1\nq_missing\td_alpha\t1\n",
         r'qrels/test.tsv line 3: "query-id" \'q_missing\' is not in queries.jsonl'),
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d2", "title": "t"}\n',
         r'corpus.jsonl line 2: missing "text"'),
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n',
         r'corpus.jsonl line 2: duplicate "_id"'),
        ("queries.jsonl", '{"_id": "q_alpha", "text": "alpha"\n', r"queries.jsonl line 1: invalid JSON"),
        ("queries.jsonl", '{"_id": "q_alpha", "text": ["alpha"]}\n', r'queries.jsonl line 1: "text" must be a string'),
    ],
)
def test_malformed_beir_data_names_file_line_and_field(tmp_path, file, content, message):
    root = write_beir(tmp_path)
    (root / file).write_text(content)
    with pytest.raises(EvalDataError, match=message):
        load_beir(str(root), "test")


def test_malformed_classification_data_names_file_line_and_field(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nball,sport\nno label column here\n")
    with pytest.raises(EvalDataError, match=r'train.csv line 3: missing "label"'):
        load_labeled(str(path))
    with pytest.raises(EvalDataError, match=r'train.csv line 2: missing "category"'):
        load_labeled(str(path), label_field="category")
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text('{"text": "ball", "label": "sport"}\n{"text": "oven"}\n')
    with pytest.raises(EvalDataError, match=r'test.jsonl line 2: missing "label"'):
        load_labeled(str(jsonl))


def test_missing_split_names_the_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"qrels/dev.tsv not found"):
        load_beir(str(write_beir(tmp_path)), "dev")


# --- real data --------------------------------------------------------------------------------------------------------

SHARED_DATA = find_shared_data()
skip_without_shared_data = pytest.mark.skipif(
    SHARED_DATA is None,
    reason=f"shared evaluation data not found: set {SHARED_DATA_ENV} or provide ../shared/data beside the repository")


@pytest.mark.needs_shared_data
@skip_without_shared_data
def test_scifact_and_banking77_subsets_through_the_real_readers(tmp_path):
    """The real files through the real readers, with a hashed bag-of-words model (instant) on a SciFact subset (20
    judged claims among 400 abstracts) and on 770 / 200 Banking77 texts; MiniLM's figure is the benchmark's job."""
    scifact = load_beir(str(SHARED_DATA / "scifact"), "test")
    assert (len(scifact.corpus_ids), len(scifact.query_ids)) == (5183, 300)
    assert sum(len(judged) for judged in scifact.qrels.values()) == 339
    queries = scifact.query_ids[:20]
    relevant = {doc for query in queries for doc in scifact.qrels[query]}
    texts = dict(zip(scifact.corpus_ids, scifact.corpus_texts, strict=True))
    kept = [doc for doc in scifact.corpus_ids if doc in relevant] + [
        doc for doc in scifact.corpus_ids if doc not in relevant][: 400 - len(relevant)]
    subset = write_beir(tmp_path / "scifact-subset", corpus={doc: ("", texts[doc]) for doc in kept},
                        queries=dict(zip(scifact.query_ids, scifact.query_texts, strict=True)),
                        qrels={"test": [(query, doc, score) for query in queries
                                        for doc, score in scifact.qrels[query].items()]})
    banking = SHARED_DATA / "banking77"
    tasks = [RetrievalTask("scifact-subset", str(subset)),
             ClassificationTask("banking77", str(banking / "train.csv"), str(banking / "test.csv"),
                                label_field="category", max_train=770, max_test=200)]
    # One dimension: truncating hashed bag-of-words vectors only measures hash collisions.
    report = evaluate_models({"bag-of-words": KeywordEmbedder(dimension=1024)}, tasks, [1024],
                             str(tmp_path / "report"), show_progress=False)
    retrieval = metrics_of(report, "bag-of-words", "scifact-subset")
    classification = metrics_of(report, "bag-of-words", "banking77")
    # Word overlap finds cited abstracts far above chance (a random ranking of 400 gives nDCG@10 near 0.01; measured
    # here 0.52) ...
    assert retrieval[1024, "float32"]["ndcg@10"] > 0.3
    # ... and 10 examples per intent name it far above chance (1/77; measured here 0.335).
    assert classification[1024, "float32"]["accuracy"] > 0.15
    assert report["tasks"][1]["train_total"] == 10003 and report["tasks"][1]["test_total"] == 3080


def test_shared_data_folder_comes_from_the_environment_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    assert find_shared_data() == tmp_path
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "absent"))
    assert find_shared_data() is None
