"""The run manifest (`manifest.json`): what a run was asked, what it used, and where every row went.

It is JSON, not Parquet, but it is a contract like the shards: the dataset card, `embforge publish` and the tests read
it. `config` is free-form (the whole run configuration); everything else is typed by `MANIFEST` and checked by
`validate_manifest`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from data_schemas.validate import SchemaError, validate_rows, versioned

_COUNT = pa.int64()

STAGE_COUNTS = pa.struct([
    pa.field("stage", pa.string(), nullable=False),
    pa.field("input", _COUNT, nullable=False),
    pa.field("kept", _COUNT, nullable=False),
    pa.field("rejected", _COUNT, nullable=False),
    pa.field("reasons", pa.map_(pa.string(), _COUNT), nullable=False),
    # Rows a stage adds beyond one per input (several queries per passage): kept may exceed input by this much.
    pa.field("expanded", _COUNT, nullable=False),
    # Inputs deliberately left out, not rejected: passages outside the configured sample.
    pa.field("skipped", _COUNT, nullable=False),
])

LLM_USAGE = pa.struct([
    pa.field("stage", pa.string(), nullable=False),
    pa.field("calls", _COUNT, nullable=False),
    pa.field("cache_hits", _COUNT, nullable=False),
    # Requests not sent because the run's LLM budget (max_llm_calls / max_cost_usd) was spent.
    pa.field("skipped_by_budget", _COUNT, nullable=False),
    pa.field("input_tokens", _COUNT, nullable=False),
    pa.field("output_tokens", _COUNT, nullable=False),
    pa.field("estimated_cost_usd", pa.float64(), nullable=False),
])

EMBEDDING_USAGE = pa.struct([
    pa.field("stage", pa.string(), nullable=False),
    # Distinct texts sent to the embedding backend, and texts answered from the cache.
    pa.field("texts_embedded", _COUNT, nullable=False),
    pa.field("cache_hits", _COUNT, nullable=False),
    # Texts left unembedded because the run's max_cost_usd was spent.
    pa.field("skipped_by_budget", _COUNT, nullable=False),
    # The embedding API reports no token counts: the texts sent at UTF-8 bytes / 3, an upper estimate.
    pa.field("estimated_input_tokens", _COUNT, nullable=False),
    pa.field("estimated_cost_usd", pa.float64(), nullable=False),
])

BATCH_JOB = pa.struct([
    pa.field("stage", pa.string(), nullable=False),
    # The Batch API's job name (batches/...): what to look up in AI Studio or cancel.
    pa.field("name", pa.string(), nullable=False),
    # How it ended: JOB_STATE_SUCCEEDED, or EXPIRED / CANCELLED / FAILED (its requests then asked online).
    pa.field("state", pa.string(), nullable=False),
    pa.field("requests", _COUNT, nullable=False),
    # Result lines carrying an error instead of an answer (the service reports no per-job statistics).
    pa.field("failed_lines", _COUNT, nullable=False),
    # Requests asked online after the job: failed lines, answers that did not validate, a job without results.
    pa.field("asked_online", _COUNT, nullable=False),
])

#: Version 2 added `embedding_usage` and the top-level `estimated_cost_usd`, version 3 `batch_jobs`; `load_manifest`
#: reads versions 1 and 2 too.
MANIFEST = versioned("manifest", 3, [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("created_at", pa.string(), nullable=False),
    pa.field("embforge_version", pa.string(), nullable=False),
    pa.field("package_versions", pa.map_(pa.string(), pa.string()), nullable=False),
    # role ("llm", "teacher") -> "model_id@model_version"
    pa.field("models", pa.map_(pa.string(), pa.string()), nullable=False),
    pa.field("prompt_versions", pa.map_(pa.string(), pa.string()), nullable=False),
    pa.field("stages", pa.list_(STAGE_COUNTS), nullable=False),
    pa.field("cache", pa.map_(pa.string(), _COUNT), nullable=False),
    pa.field("llm_usage", pa.list_(LLM_USAGE), nullable=False),
    # Teacher embeddings (EmbedTeacher), priced like LLM calls; a local teacher costs 0.
    pa.field("embedding_usage", pa.list_(EMBEDDING_USAGE), nullable=False),
    # LLM and embedding cost together: what max_cost_usd caps.
    pa.field("estimated_cost_usd", pa.float64(), nullable=False),
    # record kind -> rows written
    pa.field("outputs", pa.map_(pa.string(), _COUNT), nullable=False),
    pa.field("mining", pa.map_(pa.string(), _COUNT), nullable=False),
    # Gemini Batch API jobs the run waited on (generate.llm.mode / generate.teacher.mode = "batch"); empty online.
    pa.field("batch_jobs", pa.list_(BATCH_JOB), nullable=False),
    pa.field("budget", pa.map_(pa.string(), pa.float64()), nullable=False),
    # True when every stage balances (input + expanded = kept + rejected + skipped); a run with False fails.
    pa.field("balanced", pa.bool_(), nullable=False),
    # Shard files written, relative to the run directory.
    pa.field("files", pa.list_(pa.string()), nullable=False),
])

FREE_FORM_KEYS = ("config",)


def stage_balances(stage: Mapping[str, Any]) -> bool:
    """input + expanded = kept + rejected + skipped: every row a stage received (or fanned out to) is accounted for."""
    return stage["input"] + stage["expanded"] == stage["kept"] + stage["rejected"] + stage["skipped"]


def validate_manifest(document: Mapping[str, Any], *, source: str = "manifest.json") -> None:
    if not isinstance(document, Mapping):
        raise SchemaError("expected a JSON object", source=source)
    for key in FREE_FORM_KEYS:
        if not isinstance(document.get(key), Mapping):
            raise SchemaError("missing or not an object", source=source, column=key)
    typed = {key: value for key, value in document.items() if key not in FREE_FORM_KEYS}
    validate_rows([typed], MANIFEST, source=source)
    for index, stage in enumerate(document["stages"]):
        if sum(stage["reasons"].values()) != stage["rejected"]:
            raise SchemaError(f"stage {stage['stage']!r}: rejection reasons add up to {sum(stage['reasons'].values())},"
                              f" not {stage['rejected']}", source=source, column=f"stages[{index}]")


def load_manifest(path: str) -> dict[str, Any]:
    """Read and validate a manifest through Beam filesystems (local path or gs://)."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        try:
            document = json.loads(handle.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SchemaError(f"not valid JSON: {error}", source=path) from error
    validate_manifest(_from_version_2(_from_version_1(document)), source=path)
    return document


def _from_version_2(document: Any) -> Any:
    """A manifest written before batch mode, with its (then always empty) `batch_jobs`."""
    if isinstance(document, dict) and "batch_jobs" not in document:
        document["batch_jobs"] = []
    return document


def _from_version_1(document: Any) -> Any:
    """A version-1 manifest (written before teacher embeddings were priced) with the version-2 fields filled in: no
    embedding usage recorded, and the LLM cost as the whole estimate. Anything else is returned as it is."""
    if not isinstance(document, dict) or "embedding_usage" in document or "estimated_cost_usd" in document:
        return document
    usage = document.get("llm_usage")
    if not isinstance(usage, list):
        return document
    document["embedding_usage"] = []
    document["estimated_cost_usd"] = float(sum(row.get("estimated_cost_usd", 0.0) for row in usage
                                               if isinstance(row, Mapping)))
    return document
