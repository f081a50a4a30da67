"""Stage 7, WriteShards: zstd Parquet shards per record kind, then `manifest.json`.

Input: a dict record kind -> PCollection of rows (`triplets`, `pairs`, `classification`, `rejected`, ...), each row
validated against its `data_schemas` schema on the way out (a stage emitting a malformed row is a bug: the run fails
and names the kind, row and column). Tallies (`(key, count)` pairs from every stage) become the manifest's counts.

Layout: `<output>/<kind>/part-SSSSS-of-NNNNN.parquet` and `<output>/manifest.json`. `embforge generate` points
`output` at a staging folder and swaps the finished run in (pipelines/outputs.py), so a re-run never leaves duplicates
beside new shards. A shard may be empty (Beam's sharding can leave one); readers accept that.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from data_schemas import SCHEMAS, stage_balances, validate_manifest, validate_rows
from pipelines.run_layout import MANIFEST_NAME, SHARD_PREFIX


class _ValidateFn(beam.DoFn):
    def __init__(self, kind: str):
        self._kind = kind
        self._schema = SCHEMAS[kind]
        self._index = 0

    def process(self, row: Mapping[str, Any]):
        validate_rows([row], self._schema, source=f"{self._kind} output (row {self._index} of this worker)")
        self._index += 1
        yield row


def assemble_manifest(tallies: Mapping[tuple[str, ...], int], static: Mapping[str, Any],
                      stage_order: Iterable[str], files: Iterable[str] = ()) -> dict[str, Any]:
    """Build the manifest from summed tallies.

    Tally keys: ("stage", stage, field) for input/kept/expanded/skipped; ("reason", stage, reason) for rejections;
    ("llm", stage, field) for calls/cache_hits/skipped_by_budget/input_tokens/output_tokens; ("embedding", stage,
    field) for texts_embedded/cache_hits/skipped_by_budget/estimated_input_tokens; ("cost", stage) in micro-USD (LLM
    and embedding stages alike; their sum is `estimated_cost_usd`); ("cache", name); ("outputs", kind); ("mining",
    name); ("batch_job", stage, job name, field) for requests/failed_lines/asked_online, and "state:<state>".
    """
    stages = []
    for stage in stage_order:
        reasons = {key[2]: count for key, count in tallies.items() if key[0] == "reason" and key[1] == stage}
        counts = {field: tallies.get(("stage", stage, field), 0) for field in ("input", "kept", "expanded", "skipped")}
        stages.append(
            {"stage": stage, **counts, "rejected": sum(reasons.values()), "reasons": dict(sorted(reasons.items()))}
        )
    llm_stages = sorted({key[1] for key in tallies if key[0] == "llm"})
    llm_usage = [
        {
            "stage": stage,
            **{field: tallies.get(("llm", stage, field), 0)
               for field in ("calls", "cache_hits", "skipped_by_budget", "input_tokens", "output_tokens")},
            "estimated_cost_usd": tallies.get(("cost", stage), 0) / 1e6,
        }
        for stage in llm_stages
    ]
    embedding_stages = sorted({key[1] for key in tallies if key[0] == "embedding"})
    embedding_usage = [
        {
            "stage": stage,
            **{field: tallies.get(("embedding", stage, field), 0)
               for field in ("texts_embedded", "cache_hits", "skipped_by_budget", "estimated_input_tokens")},
            "estimated_cost_usd": tallies.get(("cost", stage), 0) / 1e6,
        }
        for stage in embedding_stages
    ]
    jobs: dict[tuple[str, str], dict[str, Any]] = {}
    for key, count in tallies.items():
        if key[0] == "batch_job":
            _, stage, name, field = key
            job = jobs.setdefault((stage, name), {"stage": stage, "name": name, "state": "", "requests": 0,
                                                  "failed_lines": 0, "asked_online": 0})
            if field.startswith("state:"):
                job["state"] = field.removeprefix("state:")
            else:
                job[field] += count
    manifest = {
        **static,
        "stages": stages,
        "cache": {key[1]: count for key, count in sorted(tallies.items()) if key[0] == "cache"},
        "llm_usage": llm_usage,
        "embedding_usage": embedding_usage,
        # Summed in micro-USD, then converted once: comparable with budget.max_cost_usd.
        "estimated_cost_usd": sum(count for key, count in tallies.items() if key[0] == "cost") / 1e6,
        "outputs": {key[1]: count for key, count in sorted(tallies.items()) if key[0] == "outputs"},
        "mining": {key[1]: count for key, count in sorted(tallies.items()) if key[0] == "mining"},
        "batch_jobs": [jobs[key] for key in sorted(jobs)],
        "balanced": all(stage_balances(stage) for stage in stages),
        "files": sorted(files),
    }
    validate_manifest(manifest)
    return manifest


class _WriteManifestFn(beam.DoFn):
    def __init__(self, output: str, static: Mapping[str, Any], stage_order: tuple[str, ...]):
        self._output = output
        self._static = dict(static)
        self._stage_order = stage_order

    def process(self, _, tallies, written_files):
        summed: dict[tuple[str, ...], int] = {}
        for key, count in tallies:
            summed[key] = summed.get(key, 0) + count
        files = [posixpath.relpath(path, self._output) for path in written_files]
        manifest = assemble_manifest(summed, self._static, self._stage_order, files)
        path = posixpath.join(self._output, MANIFEST_NAME)
        with FileSystems.create(path) as handle:
            handle.write(json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"))
        yield path


class WriteShards(beam.PTransform):
    """{kind: rows} + tallies -> shards and manifest.json; outputs the manifest path."""

    def __init__(self, output: str, static_manifest: Mapping[str, Any], stage_order: tuple[str, ...],
                 num_shards: int = 0):
        super().__init__()
        self._output = output
        self._static = static_manifest
        self._stage_order = stage_order
        self._num_shards = num_shards

    def expand(self, inputs):
        rows_by_kind: dict[str, Any] = inputs["rows"]
        tallies = [inputs["tallies"]]
        written = []
        for kind, rows in sorted(rows_by_kind.items()):
            checked = rows | f"Validate{kind}" >> beam.ParDo(_ValidateFn(kind))
            tallies.append(
                checked
                | f"Count{kind}" >> beam.combiners.Count.Globally()
                | f"Tally{kind}" >> beam.Map(lambda count, kind=kind: (("outputs", kind), count))
            )
            written.append(
                checked
                | f"Write{kind}" >> beam.io.WriteToParquet(
                    posixpath.join(self._output, kind, SHARD_PREFIX),
                    SCHEMAS[kind],
                    codec="zstd",
                    file_name_suffix=".parquet",
                    num_shards=self._num_shards,
                )
            )
        all_tallies = tuple(tallies) | "AllTallies" >> beam.Flatten()
        written_files = tuple(written) | "WrittenFiles" >> beam.Flatten()
        return (
            inputs["tallies"].pipeline
            | "ManifestTrigger" >> beam.Create([None])
            | "WriteManifest" >> beam.ParDo(
                _WriteManifestFn(self._output, self._static, self._stage_order),
                beam.pvalue.AsList(all_tallies),
                beam.pvalue.AsList(written_files),
            )
        )
