"""Evaluator (issue #4): any `Embedder` on BEIR retrieval and labeled classification, at Matryoshka dimensions, in
float32 and int8, models side by side.

Done when: with `KeywordEmbedder` (right answers known) a perfect model scores 1.0 everywhere, a model that confuses
two keywords scores exactly the hand-computed values, and the report files hold the table and the plot. The real-data
checks (SciFact, Banking77 subsets through the same code) are marked `needs_shared_data`; the full SciFact figure is
benchmarks/eval_scifact.py. The data readers, the metrics and int8 have their own modules: test_eval_data.py,
test_metrics.py, test_quantize.py.
"""

from __future__ import annotations

import json
import math

import pytest

from embedder.eval_data import load_beir
from embedder.evaluate import ClassificationTask, RetrievalTask, evaluate_models
from tests.eval_data_factory import KEYWORDS, ConfusedEmbedder, write_beir, write_labeled_csv
from tests.fakes.backends import KeywordEmbedder
from tests.shared_data import SHARED_DATA_ENV, find_shared_data


def keyword_model(dimension: int = 32) -> KeywordEmbedder:
    return KeywordEmbedder(KEYWORDS, dimension)


def metrics_of(report: dict, model: str, task: str | None = None) -> dict[tuple[int, str], dict[str, float]]:
    return {(row["dimension"], row["precision"]): row["metrics"] for row in report["results"]
            if row["model"] == model and (task is None or row["task"] == task)}


# --- retrieval end to end ---------------------------------------------------------------------------------------------


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


# --- report files -----------------------------------------------------------------------------------------------------


def test_report_json_md_and_png_are_written(tmp_path):
    output = tmp_path / "report"
    report = evaluate_models({"base": keyword_model(), "trained": ConfusedEmbedder(KEYWORDS, 32)},
                             [RetrievalTask("toy", str(write_beir(tmp_path / "beir")))], [32, 16], str(output),
                             show_progress=False)
    assert json.loads((output / "report.json").read_text()) == report
    markdown = (output / "report.md").read_text()
    assert "| metric | dim | embedding precision | base | trained | Δ trained |" in markdown
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


# --- weight and embedding precision -----------------------------------------------------------------------------------


class Int4KeywordEmbedder(KeywordEmbedder):
    """Stands for a quantized student: the same vectors, int4 weights."""

    weight_precision = "int4"


def test_the_report_states_weight_precision_and_embedding_precision_apart(tmp_path):
    output = tmp_path / "report"
    report = evaluate_models({"float": keyword_model(), "int4": Int4KeywordEmbedder(KEYWORDS, 32)},
                             [RetrievalTask("toy", str(write_beir(tmp_path / "beir")))], [32], str(output),
                             binary=True, show_progress=False)
    assert report["report_version"] == 3
    assert {name: info["weight_precision"] for name, info in report["models"].items()} == {"float": None,
                                                                                           "int4": "int4"}
    assert report["precisions"] == ["float32", "int8", "binary", "binary+rescore"]
    cells = {(row["model"], row["weight_precision"], row["precision"]) for row in report["results"]}
    assert cells == {(model, weights, embeddings) for model, weights in (("float", None), ("int4", "int4"))
                     for embeddings in report["precisions"]}
    markdown = (output / "report.md").read_text()
    assert "| weight precision |" in markdown and "| int4 |" in markdown
    assert "| ndcg@10 | 32 | binary+rescore | 1.0000 | 1.0000 |" in markdown
    assert "binary embeddings: sign bit per dimension" in markdown


def test_binary_embeddings_are_off_unless_asked(tmp_path):
    report = evaluate_models({"keyword": keyword_model()}, [RetrievalTask("toy", str(write_beir(tmp_path)))], [32],
                             str(tmp_path / "report"), show_progress=False)
    assert report["precisions"] == ["float32", "int8"]


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
