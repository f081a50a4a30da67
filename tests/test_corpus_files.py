"""Finding a corpus's files and their formats (pipelines/stages/corpus_files.py)."""

from __future__ import annotations

import re

import pytest

from pipelines.stages.corpus_files import CorpusError, detect_format, plan_corpus


@pytest.mark.parametrize("path, expected", [
    ("gs://b/corpus/part-0.jsonl", "jsonl"),
    ("x.JSONL.gz", "jsonl"),
    ("x.json", "jsonl"),
    ("beir/scifact/corpus.jsonl", "beir"),
    ("shard-00000.parquet", "parquet"),
    ("shard.parquet.gz", None),
    ("README.md", "text"),
    ("notes.txt", "text"),
    ("image.png", None),
    ("Makefile", None),
])
def test_format_from_the_file_name(path, expected):
    assert detect_format(path) == expected


def test_a_path_that_matches_nothing_is_an_error(tmp_path):
    missing = str(tmp_path / "nope" / "*.jsonl")
    with pytest.raises(CorpusError, match=re.escape(f"corpus path {missing} matches no files")):
        plan_corpus(missing)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CorpusError, match="matches no files"):
        plan_corpus(str(tmp_path / "empty_folder"))
    with pytest.raises(CorpusError, match="unknown builtin corpus"):
        plan_corpus("builtin:nope")


def test_folders_read_known_formats_and_skip_hidden_files(tmp_path):
    for name in ("b.md", "sub/a.txt", "sub/c.jsonl", ".git/x.md", "logo.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    files = plan_corpus(str(tmp_path))
    assert [(f.relative_path, f.format) for f in files] == [("b.md", "text"), ("sub/a.txt", "text"),
                                                           ("sub/c.jsonl", "jsonl")]
    globbed = plan_corpus(str(tmp_path / "**" / "*.txt"))
    assert [f.relative_path for f in globbed] == ["sub/a.txt"]
    with pytest.raises(CorpusError, match="cannot tell the format"):
        plan_corpus(str(tmp_path / "logo.png"))
    assert plan_corpus(str(tmp_path / "logo.png"), "text")[0].format == "text"


def test_a_beir_folder_reads_only_its_corpus(tmp_path):
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert [(f.relative_path, f.format) for f in plan_corpus(str(tmp_path))] == [
        ("corpus.jsonl", "beir")]
