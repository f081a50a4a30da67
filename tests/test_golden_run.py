"""A fixed generate run against a stored fixture: restructuring the code must not change what the pipeline produces.

`tests/golden/generate_run.json` holds every shard row, the manifest and every cache entry of one run of the end-to-end
Gemini configuration (tests/test_pipeline_e2e.py: LLM grading with the round trip, LLM negative scoring, counterfactual
classification data), written by the code before the tree was reorganised. Rows are compared as sets, because Beam
does not fix the order of rows inside shards. Masked: run ids, times, package versions, the run's temporary paths and
the checkout's folder (the config names the task spec by its path in the checkout).

To refresh it after an intended change of output: `EMBFORGE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_run.py`,
then review the fixture's diff like code.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipelines.run import generate
from tests.test_pipeline_e2e import gemini, gemini_config  # noqa: F401 - `gemini` is a fixture used by name

pytestmark = pytest.mark.slow

FIXTURE = os.path.join(os.path.dirname(__file__), "golden", "generate_run.json")
#: Manifest fields that differ between two runs of one config: identity, time, the installed packages.
VOLATILE_MANIFEST_FIELDS = ("run_id", "created_at", "embforge_version", "package_versions")


def _masked(value: Any, replacements: dict[str, str]) -> Any:
    """`value` as JSON text with the run's temporary paths and server address replaced by stable names."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)
    for actual, stable in replacements.items():
        text = text.replace(actual, stable)
    return json.loads(text)


def _folder(folder: str, replacements: dict[str, str]) -> dict[str, list[str]]:
    """The rows of every shard in `folder` and its subfolders (a cache's partitions), sorted, as JSON lines, and the
    shards' schemas (with their metadata)."""
    rows, schemas = [], set()
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True)):
        table = pq.read_table(path)
        if table.num_columns:  # Beam's sharding can leave a shard without columns
            schemas.add(table.schema.to_string(show_schema_metadata=True))
        rows += [json.dumps(_masked(row, replacements), sort_keys=True, ensure_ascii=False)
                 for row in table.to_pylist()]
    return {"rows": sorted(rows), "schemas": sorted(schemas)}


def run_snapshot(run_dir: str, cache_dir: str, replacements: dict[str, str]) -> dict[str, Any]:
    """Everything a run produced, in an order-free, run-independent form."""
    with open(os.path.join(run_dir, "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    for field in VOLATILE_MANIFEST_FIELDS:
        manifest.pop(field, None)
    def folders(root: str) -> dict[str, dict[str, list[str]]]:
        names = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
        return {name: _folder(os.path.join(root, name), replacements) for name in names}

    return {"manifest": _masked(manifest, replacements), "shards": folders(run_dir), "cache": folders(cache_dir)}


def test_generate_output_matches_the_stored_run(tmp_path, gemini):  # noqa: F811 - the fixture, by name
    config = gemini_config(tmp_path, gemini)
    generate(config)
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    replacements = {str(tmp_path): "<tmp>", gemini.base_url: "<server>", repository: "<repo>"}
    snapshot = run_snapshot(config.output, config.cache_dir, replacements)
    if os.environ.get("EMBFORGE_UPDATE_GOLDEN"):
        with open(FIXTURE, "w", encoding="utf-8") as handle:
            json.dump(snapshot, handle, indent=1, sort_keys=True, ensure_ascii=False)
            handle.write("\n")
    with open(FIXTURE, encoding="utf-8") as handle:
        stored = json.load(handle)
    assert snapshot["manifest"] == stored["manifest"]
    assert sorted(snapshot["shards"]) == sorted(stored["shards"])
    for kind, stored_folder in stored["shards"].items():
        assert snapshot["shards"][kind] == stored_folder, f"{kind} shards differ from the stored run"
    assert sorted(snapshot["cache"]) == sorted(stored["cache"])
    for kind, stored_folder in stored["cache"].items():
        assert snapshot["cache"][kind] == stored_folder, f"{kind} cache entries differ from the stored run"
