"""The hold-out split `embforge run` trains and evaluates on: a stable share of the queries held out as a BEIR set
against every passage, the rest (and every classification example) for training, on any Beam filesystem."""

from __future__ import annotations

import json

import pytest
from apache_beam.io.filesystems import FileSystems

from data_schemas import CLASSIFICATION_EXAMPLE, PASSAGE, TRIPLET
from embedder.data import read_run
from embedder.eval_data import load_beir
from pipelines.holdout import corpus_passages, is_held_out, split_run
from pipelines.run_layout import read_kind
from pipelines.stages.read_corpus import ReadCorpusConfig
from tests.shard_factory import classification_rows, triplet_rows, write_run, write_shard

FRACTION = 0.25


def _run(root: str, classification: list[dict] | None = None) -> str:
    write_run(root, classification=classification)
    passages = {(row["positive_id"], row["positive"]) for row in triplet_rows()}
    passages |= {(passage_id, text) for row in triplet_rows() for passage_id, text in
                 zip(row["negative_ids"], row["negatives"], strict=True)}
    write_shard(FileSystems.join(root, "passages", "part-00000-of-00001.parquet"),
                [{"passage_id": passage_id, "title": None, "text": text, "source": "test", "truncated": False}
                 for passage_id, text in sorted(passages)], PASSAGE)
    return root


@pytest.mark.parametrize("where", ["local", "memfs"])
def test_the_split_holds_out_queries_and_trains_on_the_rest_and_on_every_classification_example(
        tmp_path, memfs, where):
    run = _run(str(tmp_path / "run") if where == "local" else f"{memfs}/run")
    split = split_run(run, FRACTION, seed=0)

    held = [row for row in triplet_rows() if is_held_out(row["query_id"], FRACTION, 0)]
    assert 0 < len(held) < len(triplet_rows())
    assert split.eval_queries == len(held) and split.train_triplets == len(triplet_rows()) - len(held)
    trained_on = read_kind(split.train_dir, "triplets", TRIPLET).column("query_id").to_pylist()
    assert sorted(trained_on) == sorted(row["query_id"] for row in triplet_rows() if row not in held)
    # Counterfactuals and seeds have no queries to hold out: all of them reach training.
    assert split.train_classification == len(classification_rows())
    assert read_kind(split.train_dir, "classification", CLASSIFICATION_EXAMPLE).num_rows == len(classification_rows())
    data = read_run(split.train_dir)
    assert len(data.triplets) == split.train_triplets and len(data.classification) == len(classification_rows())

    beir = load_beir(split.eval_dir)
    assert sorted(beir.query_ids) == sorted(row["query_id"] for row in held)
    assert {query: dict(judged) for query, judged in beir.qrels.items()} == {
        row["query_id"]: {row["positive_id"]: 1} for row in held}
    assert len(beir.corpus_ids) == read_kind(run, "passages", PASSAGE).num_rows


def test_splitting_again_replaces_the_earlier_split(tmp_path):
    run = _run(str(tmp_path / "run"))
    first = split_run(run, FRACTION, seed=0)
    second = split_run(run, 0.5, seed=0)
    assert second.eval_queries > first.eval_queries
    assert read_kind(second.train_dir, "triplets", TRIPLET).num_rows == second.train_triplets
    with open(FileSystems.join(second.eval_dir, "queries.jsonl"), encoding="utf-8") as handle:
        assert len([json.loads(line) for line in handle]) == second.eval_queries
    assert not (tmp_path / "run" / ".split.staging").exists()


def test_held_out_queries_are_searched_against_every_passage_of_the_corpus(tmp_path):
    run = _run(str(tmp_path / "run"))
    corpus = tmp_path / "passages.jsonl"
    sampled = read_kind(run, "passages", PASSAGE).to_pylist()
    unsampled = [{"id": f"extra-{index}", "text": f"a passage the sample left out, number {index}"}
                 for index in range(5)]
    lines = [{"id": row["passage_id"], "text": row["text"]} for row in sampled] + unsampled
    # A duplicate id keeps its first occurrence, as ReadCorpus does.
    lines.append({"id": "extra-0", "text": "a later duplicate"})
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    passages = corpus_passages(ReadCorpusConfig(path=str(corpus), sample=3))
    assert len(passages) == len(sampled) + len(unsampled)
    split = split_run(run, FRACTION, seed=0, corpus=passages)
    beir = load_beir(split.eval_dir)
    assert set(beir.corpus_ids) == {row["passage_id"] for row in sampled} | {line["id"] for line in unsampled}
    assert beir.corpus_texts[beir.corpus_ids.index("extra-0")].endswith("number 0")


def test_the_held_out_share_follows_the_fraction_and_is_the_same_on_every_call():
    ids = [f"query-{index}" for index in range(2000)]
    held = [query_id for query_id in ids if is_held_out(query_id, 0.2, seed=0)]
    assert 0.17 < len(held) / len(ids) < 0.23
    assert held == [query_id for query_id in ids if is_held_out(query_id, 0.2, seed=0)]
    # Another seed holds out other queries; a larger fraction holds out a superset.
    assert held != [query_id for query_id in ids if is_held_out(query_id, 0.2, seed=1)]
    assert set(held) <= {query_id for query_id in ids if is_held_out(query_id, 0.5, seed=0)}


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_a_fraction_outside_zero_to_one_is_refused_before_anything_is_written(tmp_path, fraction):
    run = _run(str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"holdout fraction must be in \(0, 1\)"):
        split_run(run, fraction)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["classification", "passages", "triplets"]


def test_a_run_without_classification_examples_trains_on_triplets_alone(tmp_path):
    run = _run(str(tmp_path / "run"), classification=[])
    split = split_run(run, FRACTION, seed=0)
    assert split.train_classification == 0
    assert not (tmp_path / "run" / "train_split" / "classification").exists()
    assert len(read_run(split.train_dir).triplets) == split.train_triplets
    # Passages without a title get an empty one, as BEIR writes it.
    with open(FileSystems.join(split.eval_dir, "corpus.jsonl"), encoding="utf-8") as handle:
        assert {json.loads(line)["title"] for line in handle} == {""}
