"""The content-addressed cache under concurrent writers: Beam's multi_processing runner and Dataflow workers flush new
entries to one cache folder at the same moment, and none of them may fail or lose an entry."""

from __future__ import annotations

import multiprocessing
import os
import time

from apache_beam.io.filesystems import FileSystems

from pipelines.cache import LLM_CACHE, cache_files, read_cache_file, write_cache_file

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
