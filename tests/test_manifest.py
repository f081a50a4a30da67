"""manifest.json as readers meet it: the current version validates, and a run written by the previous version (before
teacher embeddings were priced) still loads, for publishing and inspection."""

from __future__ import annotations

import json

import pytest

from data_schemas import SchemaError, load_manifest
from pipelines.stages.write_shards import assemble_manifest

STATIC = {"run_id": "r1", "created_at": "2026-11-30T00:00:00+00:00", "embforge_version": "0.1.0",
          "package_versions": {}, "models": {"llm": "m@1", "teacher": "t@1"}, "prompt_versions": {},
          "budget": {}, "config": {}}
TALLIES = {("stage", "read_corpus", "input"): 2, ("stage", "read_corpus", "kept"): 2,
           ("llm", "generate_queries", "calls"): 2, ("cost", "generate_queries"): 1500,
           ("embedding", "embed_teacher", "texts_embedded"): 4, ("cost", "embed_teacher"): 20}


def test_the_manifest_prices_llm_calls_and_teacher_embeddings_together(tmp_path):
    manifest = assemble_manifest(TALLIES, STATIC, ["read_corpus"])
    assert manifest["estimated_cost_usd"] == pytest.approx(0.00152)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    assert load_manifest(str(path)) == manifest


def test_a_version_1_manifest_still_loads(tmp_path):
    manifest = assemble_manifest(TALLIES, STATIC, ["read_corpus"])
    del manifest["embedding_usage"], manifest["estimated_cost_usd"]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    loaded = load_manifest(str(path))
    assert loaded["embedding_usage"] == [] and loaded["estimated_cost_usd"] == pytest.approx(0.0015)
    del manifest["llm_usage"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(SchemaError, match="llm_usage"):
        load_manifest(str(path))
