"""Evaluation data readers: BEIR folders and labeled files, read as the evaluator reads them, and bad data stopped
with the file, the line and the field."""

from __future__ import annotations

import pytest

from embedder.eval_data import EvalDataError, load_beir, load_labeled
from tests.eval_data_factory import write_beir, write_labeled_csv


def test_load_beir_joins_title_and_text_and_keeps_only_judged_queries(tmp_path):
    data = load_beir(str(write_beir(tmp_path)), "test")
    texts = dict(zip(data.corpus_ids, data.corpus_texts, strict=True))
    assert texts["d_delta"] == "delta unrelated words here"
    assert texts["d_alpha"] == "alpha"  # an empty title leaves no leading space
    assert data.query_ids == ("q_alpha", "q_beta", "q_delta", "q_epsilon")
    assert data.qrels["q_beta"] == {"d_beta": 1}


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
        ("queries.jsonl", '{"_id": "q_alpha", "text": "alpha"\n', r"queries.jsonl line 1: not valid JSON"),
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
