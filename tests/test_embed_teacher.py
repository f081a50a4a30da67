from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.cache import EMBEDDING_CACHE, cache_files, read_cache_file
from pipelines.clients.base import TaskType
from pipelines.clients.factory import EmbedderSpec
from pipelines.stages.embed_teacher import EmbedTeacher, EmbedTeacherConfig, embedding_cache_key
from tests.fakes import keyword_embedder

SPEC = EmbedderSpec(backend="custom", model="tests.fakes:keyword_embedder")
ITEMS = [
    {"id": "q1", "text": "parse json text", "task_type": TaskType.RETRIEVAL_QUERY.value},
    {"id": "q2", "text": "parse json text", "task_type": TaskType.RETRIEVAL_QUERY.value},  # same text: embedded once
    {"id": "p1", "text": "parse json text", "task_type": TaskType.RETRIEVAL_DOCUMENT.value},
    {"id": "p2", "text": "sort a heap", "task_type": TaskType.RETRIEVAL_DOCUMENT.value},
]


def _rounded(vector) -> tuple[float, ...]:
    return tuple(round(float(x), 5) for x in vector)


def _run(cache_dir, dimension=None):
    with TestPipeline() as pipeline:
        outputs = pipeline | "Items" >> beam.Create(ITEMS) | EmbedTeacher(
            SPEC, EmbedTeacherConfig(dimension=dimension, batch_size=2), cache_dir=str(cache_dir))
        expected = keyword_embedder().embed([item["text"] for item in ITEMS], TaskType.RETRIEVAL_QUERY, dimension)
        assert_that(
            outputs["kept"] | "Round" >> beam.Map(
                lambda row: (row["id"], _rounded(row["embedding"]))),
            equal_to([(item["id"], _rounded(vector)) for item, vector in zip(ITEMS, expected, strict=True)]),
            label="Embeddings",
        )
        assert_that(outputs["rejected"], equal_to([]), label="NoRejects")
        return outputs


def test_second_run_reads_every_vector_from_the_cache(tmp_path):
    _run(tmp_path)
    first_files = cache_files(str(tmp_path), EMBEDDING_CACHE)
    entries = [row for path in first_files for row in read_cache_file(path, EMBEDDING_CACHE).to_pylist()]
    # Three distinct (task type, text) pairs: the duplicate query text was embedded once.
    assert len(entries) == 3
    _run(tmp_path)
    assert cache_files(str(tmp_path), EMBEDDING_CACHE) == first_files, "a re-run wrote new cache entries"


def test_dimension_is_part_of_the_key(tmp_path):
    _run(tmp_path, dimension=16)
    entries = [row for path in cache_files(str(tmp_path), EMBEDDING_CACHE)
               for row in read_cache_file(path, EMBEDDING_CACHE).to_pylist()]
    assert {row["dimension"] for row in entries} == {16}
    key16 = embedding_cache_key("m", "v", "RETRIEVAL_QUERY", 16, "x")
    assert key16 != embedding_cache_key("m", "v", "RETRIEVAL_QUERY", None, "x")
    assert key16 != embedding_cache_key("m", "v", "RETRIEVAL_DOCUMENT", 16, "x")


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="dimension"):
        EmbedTeacherConfig(dimension=0)
