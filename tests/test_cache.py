"""The content-addressed cache: concurrent writers (Beam's multi_processing runner and Dataflow workers flush new
entries to one cache folder at the same moment, and none of them may fail or lose an entry), partitions (a lookup
reads only what its items can hit) and the one-time move of a cache from before partitions."""

from __future__ import annotations

import multiprocessing
import os
import re
import time

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from data_schemas import LLM_CACHE_ENTRY
from pipelines import cache as cache_module
from pipelines.cache import (
    EMBEDDING_CACHE,
    LLM_CACHE,
    SplitByCache,
    cache_files,
    embedding_partition,
    llm_partition,
    migrate_flat_files,
    partition_files,
    read_cache_file,
    write_cache_file,
)

WRITERS = 8
ROUNDS = 6


def _entry(writer: int, round_index: int) -> dict:
    return {"key": f"{writer}-{round_index}", "model_id": "m", "model_version": "v", "prompt_name": "p",
            "prompt_version": "1", "response_json": "{}", "raw_answer": "{}", "input_tokens": 1, "output_tokens": 1}


def _flush_in_lockstep(root: str, writer: int, barrier, failures) -> None:
    # A remote filesystem answers "does it exist?" in tens of milliseconds; so does this one, which makes the window
    # between a check and a create as wide as it is on GCS, instead of leaving the race to luck.
    exists = FileSystems.exists

    def slow_exists(path: str) -> bool:
        found = exists(path)
        time.sleep(0.02)
        return found

    FileSystems.exists = slow_exists
    for round_index in range(ROUNDS):
        # Every round is a cache folder nobody has created yet, and every writer flushes into it at the same moment:
        # the moment two workers' first flushes race to create it.
        barrier.wait(timeout=60)
        try:
            write_cache_file(os.path.join(root, f"round-{round_index}"), LLM_CACHE, [_entry(writer, round_index)])
        except Exception as error:  # noqa: BLE001 - reported to the test, which fails on any
            failures.put(f"writer {writer}, round {round_index}: {type(error).__name__}: {error}")


def test_many_processes_flushing_to_one_new_cache_folder_at_once_all_succeed(tmp_path):
    # fork: the children need nothing but this function; spawning 8 fresh interpreters would cost seconds of imports.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(WRITERS)
    failures = context.Queue()
    writers = [context.Process(target=_flush_in_lockstep, args=(str(tmp_path), index, barrier, failures))
               for index in range(WRITERS)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    assert all(process.exitcode == 0 for process in writers)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert errors == []
    for round_index in range(ROUNDS):
        files = cache_files(str(tmp_path / f"round-{round_index}"), LLM_CACHE)
        keys = sorted(row["key"] for path in files for row in read_cache_file(path, LLM_CACHE).to_pylist())
        assert keys == sorted(f"{writer}-{round_index}" for writer in range(WRITERS))


# --- partitions ------------------------------------------------------------------------------------------------------


def _llm(key: str, model: str = "m", prompt: str = "p", version: str = "1") -> dict:
    return {"key": key, "model_id": model, "model_version": "v", "prompt_name": prompt, "prompt_version": version,
            "response_json": f'{{"answer": "{key}"}}', "raw_answer": key, "input_tokens": 1, "output_tokens": 1}


def _keys(paths: list[str]) -> list[str]:
    return sorted(row["key"] for path in paths for row in read_cache_file(path, LLM_CACHE).to_pylist())


def test_entries_are_stored_by_prompt_version_and_model_embeddings_by_model_and_task_type(tmp_path):
    cache = str(tmp_path)
    write_cache_file(cache, LLM_CACHE, [_llm("a"), _llm("b"), _llm("c", version="2"), _llm("d", model="m2")])
    assert _keys(partition_files(cache, LLM_CACHE, llm_partition("m", "v", "p", "1"))) == ["a", "b"]
    assert _keys(partition_files(cache, LLM_CACHE, llm_partition("m", "v", "p", "2"))) == ["c"]
    assert _keys(partition_files(cache, LLM_CACHE, llm_partition("m2", "v", "p", "1"))) == ["d"]
    write_cache_file(cache, EMBEDDING_CACHE, [
        {"key": key, "model_id": "t", "model_version": "v", "task_type": task_type, "dimension": 1,
         "text_sha256": "0" * 64, "embedding": [1.0]}
        for key, task_type in (("q", "RETRIEVAL_QUERY"), ("d", "RETRIEVAL_DOCUMENT"))])
    query_files = partition_files(cache, EMBEDDING_CACHE, embedding_partition("t", "v", "RETRIEVAL_QUERY"))
    assert [row["key"] for path in query_files for row in read_cache_file(path, EMBEDDING_CACHE).to_pylist()] == ["q"]


def test_partition_folders_are_safe_names_and_names_alike_once_made_safe_stay_apart():
    # A Gemini model id served at a URL, and two that differ only in characters a folder name cannot hold.
    slashed = llm_partition("gemini-2.5-flash@http://127.0.0.1:8080/v1", "v", "query/generation", "1")
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in slashed.split("/")) and slashed.count("/") == 1
    assert llm_partition("a/b", "v", "p", "1") != llm_partition("a:b", "v", "p", "1")
    assert embedding_partition("t", "v", "RETRIEVAL_QUERY") != embedding_partition("t", "v2", "RETRIEVAL_QUERY")


def _check_split(cache: str, items: list[tuple[str, dict]], hits: list[tuple[str, str]], misses: list[str]) -> None:
    """SplitByCache over `items` (keyed, each naming its prompt version) gives these hits (item id, cached answer)
    and misses (item ids)."""
    with TestPipeline() as pipeline:
        split = (pipeline | beam.Create(items)
                 | SplitByCache(cache, LLM_CACHE, lambda item: llm_partition("m", "v", "p", item["version"]), "Read"))
        found = split["hits"] | "Hits" >> beam.MapTuple(lambda items, entry: (items[0]["id"], entry["raw_answer"]))
        missed = split["misses"] | "Misses" >> beam.MapTuple(lambda key, items: items[0]["id"])
        assert_that(found, equal_to(hits), label="CheckHits")
        assert_that(missed, equal_to(misses), label="CheckMisses")


def test_a_lookup_reads_only_the_partitions_its_items_fall_in(tmp_path):
    cache = str(tmp_path)
    # Hits in version 1's partition, among another corpus's entries of the same prompt (read as keys only).
    write_cache_file(cache, LLM_CACHE, [_llm("a"), _llm("c"), *(_llm(f"other-{n}") for n in range(20))])
    # Version 2's partition holds a file no reader can parse: reading it would fail the pipeline.
    broken = tmp_path / LLM_CACHE / llm_partition("m", "v", "p", "2")
    broken.mkdir(parents=True)
    (broken / "broken.parquet").write_bytes(b"not parquet")
    _check_split(cache, [("a", {"id": "i1", "version": "1"}), ("b", {"id": "i2", "version": "1"}),
                         ("c", {"id": "i3", "version": "1"})], hits=[("i1", "a"), ("i3", "c")], misses=["i2"])
    with pytest.raises(Exception, match="broken.parquet"):
        _check_split(cache, [("a", {"id": "i1", "version": "2"})], hits=[], misses=["i1"])


# --- the layout before partitions -------------------------------------------------------------------------------------


def _flat_cache(root, rows: list[dict]) -> str:
    folder = root / LLM_CACHE
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LLM_CACHE_ENTRY), folder / "0123.parquet")
    return str(root)


def test_a_cache_from_before_partitions_is_moved_into_them_once(tmp_path):
    cache = _flat_cache(tmp_path, [_llm("a"), _llm("b", version="2")])
    assert migrate_flat_files(cache) == {"files": 1, "entries": 2}
    assert not (tmp_path / LLM_CACHE / "0123.parquet").exists()
    assert _keys(partition_files(cache, LLM_CACHE, llm_partition("m", "v", "p", "1"))) == ["a"]
    assert _keys(partition_files(cache, LLM_CACHE, llm_partition("m", "v", "p", "2"))) == ["b"]
    assert migrate_flat_files(cache) == {"files": 0, "entries": 0}


def test_an_interrupted_move_keeps_the_old_file_until_all_its_entries_are_in_partitions(tmp_path, monkeypatch):
    cache = _flat_cache(tmp_path, [_llm("a"), _llm("b", version="2")])
    real_write = cache_module._write_partition_file
    writes = []

    def killed_after_one(*args, **kwargs):
        if writes:
            raise OSError("killed")
        writes.append(real_write(*args, **kwargs))
        return writes[-1]

    monkeypatch.setattr(cache_module, "_write_partition_file", killed_after_one)
    with pytest.raises(OSError, match="killed"):
        migrate_flat_files(cache)
    assert (tmp_path / LLM_CACHE / "0123.parquet").exists()
    monkeypatch.setattr(cache_module, "_write_partition_file", real_write)
    assert migrate_flat_files(cache)["entries"] == 2
    # The entry moved before the kill is there twice, identical: a lookup takes either.
    assert _keys(cache_files(cache, LLM_CACHE)) == ["a", "a", "b"]
