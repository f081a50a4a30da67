"""Batch mode of the cached-call transform: a stage's cache misses become Gemini Batch API jobs instead of online calls.

`CachedCall` (pipelines/cached_calls.py) sends a handler's misses here when its spec's mode is "batch":

1. **Jobs.** Misses that an unfinished job of an earlier run already holds go back to that job; the rest are dealt into
   `ceil(misses / batch_max_requests)` jobs by their cache key (a hash, so the split is the same on every runner and in
   every re-run of the same misses).
2. **Records before polling.** Creating a job is not idempotent, so its name is written to
   `<cache_dir>/batch_jobs/<digest of its keys>.json` the moment it exists, before the first poll. A run killed while
   it waits, run again, finds the record (by the same digest, or because the record holds a missing key) and polls or
   downloads that job: the service sees no second job for the same requests.
3. **Answers.** Each result line goes through the handler's own parsing, validation and cache writes
   (`CallHandler.answer_batch`), as an online answer does. A line that failed, an answer that did not validate, and
   every request of a job that expired, was cancelled or failed, are asked online (billed at list price), so nothing
   is lost. The manifest lists each job: name, final state, requests, failed lines, requests asked online.

A record is marked done once its answers are cached; a done record is never polled again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.accounting import TALLIES
from pipelines.budget import split_by_plan
from pipelines.cache import CacheWriter
from pipelines.outputs import ensure_folder

LOGGER = logging.getLogger(__name__)

RECORDS_FOLDER = "batch_jobs"


@dataclass
class JobRecord:
    """What is kept of one job so that no re-run pays for it twice."""

    name: str
    stage: str
    digest: str
    keys: list[str]
    state: str = "submitted"
    created_at: float = field(default_factory=time.time)


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def record_path(cache_dir: str, digest: str) -> str:
    return posixpath.join(cache_dir, RECORDS_FOLDER, f"{digest}.json")


def read_record(path: str) -> JobRecord:
    with FileSystems.open(path) as handle:
        return JobRecord(**json.loads(handle.read().decode("utf-8")))


def write_record(cache_dir: str, record: JobRecord) -> None:
    """Atomically: a temporary file renamed over the record, so a kill never leaves half a record."""
    folder = posixpath.join(cache_dir, RECORDS_FOLDER)
    ensure_folder(folder)
    final = record_path(cache_dir, record.digest)
    temporary = posixpath.join(folder, f".{uuid.uuid4().hex}.tmp")
    with FileSystems.create(temporary) as handle:
        handle.write(json.dumps(asdict(record)).encode("utf-8"))
    if FileSystems.exists(final):
        FileSystems.delete([final])
    FileSystems.rename([temporary], [final])


def unfinished_jobs(cache_dir: str | None, stage: str) -> dict[str, str]:
    """Cache key -> digest of the unfinished job of `stage` that holds it (read once, when the pipeline is built)."""
    if not cache_dir:
        return {}
    pattern = posixpath.join(cache_dir, RECORDS_FOLDER, "*.json")
    holding = {}
    for match in FileSystems.match([pattern])[0].metadata_list:
        record = read_record(match.path)
        if record.stage == stage and record.state != "done":
            holding.update(dict.fromkeys(record.keys, record.digest))
    return holding


def job_group(key: str, holding: dict[str, str], misses: int, max_requests: int) -> str:
    """The job a miss goes to: the unfinished job holding it, else one of ceil(misses / max_requests) new ones, chosen
    by the key's leading hex digits (cache keys are sha256: spread evenly)."""
    if key in holding:
        return f"job/{holding[key]}"
    jobs = max(1, math.ceil(misses / max_requests))
    return f"new/{int(key[:12], 16) * jobs // 16**12}"


class _BatchJobFn(beam.DoFn):
    """(job group, [(key, items)]) -> the handler's outputs, through one Batch API job: submitted (or found), waited
    for, read back; what it did not answer asked online."""

    def __init__(self, handler: Any, cache_dir: str, budget_limits: str = ""):
        self._handler = handler
        self._cache_dir = cache_dir
        self._budget_limits = budget_limits

    def setup(self) -> None:
        self._client = self._handler.load_client()
        self._batch = self._handler.load_batch_client()
        self._writer = CacheWriter(self._cache_dir, self._handler.cache_kind, self._handler.flush_every)

    def process(self, element: tuple[str, list[tuple[str, list[Any]]]],
                allowed_keys: frozenset[str] | None = None) -> Iterator[Any]:
        # Batch mode is Gemini's: its SDK is imported here, in batch mode only, never by a local run.
        from pipelines.clients.gemini_batch import state_name

        group, batch = element
        handler = self._handler
        refused, to_call = split_by_plan(sorted(batch, key=lambda pair: pair[0]), allowed_keys)
        for items in refused:
            yield from handler.refuse(items, self._budget_limits)
        if not to_call:
            return
        record = self._find_or_submit(group, to_call)
        job = self._batch.wait(record.name)
        state = state_name(job)
        results = self._batch.results(job)
        if not results:
            LOGGER.warning("%s: batch job %s ended %s with no results: its %d requests are asked online",
                           handler.stage, record.name, state, len(to_call))
        failed = sum(1 for line in results.values() if "response" not in line)
        answered = [(key, items, results.get(key)) for key, items in to_call]
        outputs, asked_online = handler.answer_batch(self._client, answered, self._writer)
        yield from outputs
        self._writer.flush()
        record.state = "done"
        write_record(self._cache_dir, record)
        for field_name, count in (("requests", len(to_call)), ("failed_lines", failed), ("asked_online", asked_online),
                                  (f"state:{state}", 1)):
            handler.tally.add(("batch_job", handler.stage, record.name, field_name), count)

    def _find_or_submit(self, group: str, to_call: list[tuple[str, list[Any]]]) -> JobRecord:
        handler = self._handler
        keys = [key for key, _ in to_call]
        digest = group.removeprefix("job/") if group.startswith("job/") else keys_digest(keys)
        path = record_path(self._cache_dir, digest)
        if FileSystems.exists(path):
            record = read_record(path)
            if record.state != "done":
                LOGGER.info("%s: waiting on batch job %s of an earlier run (%d requests)", handler.stage,
                            record.name, len(record.keys))
                return record
        lines = [handler.batch_line(key, items) for key, items in to_call]
        name = self._batch.submit(lines, f"embforge-{handler.stage}-{digest[:16]}",
                                  embeddings=handler.batch_embeddings)
        record = JobRecord(name=name, stage=handler.stage, digest=digest, keys=keys)
        # Before the first poll: from here on a killed run finds this job instead of paying for another.
        write_record(self._cache_dir, record)
        return record

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._handler.tally.flush()

    def teardown(self) -> None:
        for client in (getattr(self, "_client", None), getattr(self, "_batch", None)):
            if client is not None:
                client.close()


class BatchJobs(beam.PTransform):
    """(key, items) misses -> the handler's outputs, answered through Batch API jobs (see the module docstring)."""

    def __init__(self, handler: Any, cache_dir: str | None, allowed: Any, budget_limits: str):
        super().__init__()
        if not cache_dir:
            raise ValueError(f"{handler.stage}: batch mode needs a cache dir, where its jobs are recorded")
        self._handler = handler
        self._cache_dir = cache_dir
        self._allowed = allowed
        self._budget_limits = budget_limits

    def expand(self, misses):
        handler = self._handler
        holding = unfinished_jobs(self._cache_dir, handler.stage)
        max_requests = handler.batch_max_requests
        count = misses | "CountMisses" >> beam.combiners.Count.Globally()
        side = [] if self._allowed is None else [self._allowed]
        return (
            misses
            | "JobGroup" >> beam.Map(lambda miss, total: (job_group(miss[0], holding, total, max_requests), miss),
                                     total=beam.pvalue.AsSingleton(count))
            | "ByJob" >> beam.GroupByKey()
            | "RunJobs" >> beam.ParDo(_BatchJobFn(handler, self._cache_dir, self._budget_limits), *side)
            .with_outputs(*_tags(handler), main="main")
        )


def _tags(handler: Any) -> tuple[str, ...]:

    return (TALLIES, *handler.outputs)
