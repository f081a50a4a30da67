"""`--dry-run`: no request and no file, and an estimate close to what the real run then reports.

Accuracy is measured against the fake Gemini server counting tokens as Gemini roughly does (4 characters a token) and
answering with answers the size a capable model writes (tests/fakes/sized_answers.py): the estimate's requests, its
per-stage input tokens and the run's total tokens and cost must come within ACCURACY of the manifest of the real run
that follows. Output tokens depend on the model's answers, which nothing knows before the first run; a second dry
run reads them from the cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from pipelines.cli import main
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.config import GenerateConfig
from pipelines.dry_run import (
    CacheIndex,
    compare_with_manifest,
    estimate,
    estimated_tokens,
    format_table,
    read_passages,
)
from pipelines.run import generate
from pipelines.stages.embed_teacher import EmbedTeacherConfig
from pipelines.stages.grade_relevance import GradeRelevanceConfig
from pipelines.stages.read_corpus import ReadCorpusConfig
from tests.fakes.gemini_server import FakeGeminiServer
from tests.fakes.sized_answers import gemini_like_tokens, sized_answer
from tests.test_pipeline_e2e import gemini, gemini_config, write_gemini_toml  # noqa: F401 - `gemini` is a fixture

#: The issue's bar: the dry run's token and cost estimate within +-30% of the run's manifest.
ACCURACY = 0.30
KEY = "dry-run-test-key"


def _listing(root) -> dict[str, int]:
    return {os.path.relpath(os.path.join(folder, name), root): os.path.getsize(os.path.join(folder, name))
            for folder, _, names in os.walk(root) for name in names}


def test_estimated_tokens_are_four_characters_each_rounded_up():
    assert estimated_tokens(["abcd", "efgh"]) == 2
    assert estimated_tokens(["abcde"]) == 2
    assert estimated_tokens([]) == 0


def test_read_passages_keeps_the_first_occurrence_and_the_sample_readcorpus_keeps(tmp_path):
    corpus = tmp_path / "passages.jsonl"
    rows = [{"id": f"p{index}", "text": f"passage {index}"} for index in range(10)]
    rows += [{"id": "p3", "text": "a later duplicate"}, {"id": "", "text": "no id"}]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = GenerateConfig(corpus=ReadCorpusConfig(path=str(corpus)))
    passages, rejected = read_passages(config)
    assert len(passages) == 10 and rejected == 2
    assert next(passage for passage in passages if passage["passage_id"] == "p3")["text"] == "passage 3"
    sampled, _ = read_passages(replace(config, corpus=replace(config.corpus, sample=4)))
    assert len(sampled) == 4 and {row["passage_id"] for row in sampled} < {row["passage_id"] for row in passages}


@pytest.mark.slow
def test_dry_run_makes_no_request_and_writes_nothing(tmp_path, gemini, capsys, monkeypatch):  # noqa: F811
    # The end-to-end Gemini corpus, with every retrieval LLM stage on.
    config = gemini_config(tmp_path, gemini)
    toml = write_gemini_toml(tmp_path / "run.toml", gemini, cache_dir=config.cache_dir, corpus=config.corpus.path,
                             output=config.output)
    every_llm_stage = ["--set", "generate.grading.use_llm=true", "--set", "generate.mining.llm_scoring=true",
                       "--set", "generate.mining.llm_candidates=5"]
    monkeypatch.chdir(tmp_path)
    before = _listing(tmp_path)
    assert main(["generate", "--config", toml, "--dry-run", *every_llm_stage]) == 0
    table = capsys.readouterr().out
    assert main(["run", "--config", toml, "--dry-run", "json", *every_llm_stage]) == 0
    estimate_json = json.loads(capsys.readouterr().out)
    assert gemini.requests == []
    assert _listing(tmp_path) == before
    assert not os.path.exists(config.output) and not os.path.exists(config.cache_dir)
    assert "generate_queries" in table and "mine_negatives" in table and "<=" in table
    stages = {(stage["stage"], stage["what"]) for stage in estimate_json["stages"]}
    assert ("grade_relevance", "LLM calls") in stages and ("mine_negatives", "LLM scoring calls") in stages
    assert estimate_json["passages"] == 10


@pytest.mark.slow
def test_the_estimate_is_within_30_percent_of_the_runs_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    fast = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0}
    with FakeGeminiServer(generate=sized_answer, count_tokens=gemini_like_tokens) as server:
        config = GenerateConfig(
            output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
            corpus=ReadCorpusConfig(sample=16),
            llm=LLMSpec(backend="gemini", base_url=server.base_url, **fast),
            teacher=EmbedderSpec(backend="gemini", base_url=server.base_url, **fast),
            embed=EmbedTeacherConfig(dimension=64),
            grading=GradeRelevanceConfig(use_llm=True, use_roundtrip=False))
        estimated = estimate(config)
        assert server.requests == []
        manifest = generate(config)
        again = estimate(config)

    ratios = compare_with_manifest(estimated, manifest)
    for stage in ("generate_queries", "grade_relevance", "embed_teacher"):
        assert ratios[stage]["requests"] == 1.0, (stage, ratios[stage])
    for stage in ("generate_queries", "grade_relevance"):
        assert abs(ratios[stage]["input_tokens"] - 1) <= ACCURACY, (stage, ratios[stage])
    total = ratios["total"]
    assert abs(total["input_tokens"] - 1) <= ACCURACY and abs(total["cost"] - 1) <= ACCURACY, total

    # After the run everything it asked is cached: the stages known exactly have nothing left to ask.
    assert all(stage.requests == 0 and stage.exact for stage in again.stages), format_table(again, config)
    assert any(stage.cached for stage in again.stages)


def test_the_cache_index_reads_only_what_the_runs_models_can_hit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_schemas import LLM_CACHE_ENTRY
    from pipelines.cache import EMBEDDING_CACHE, LLM_CACHE, write_cache_file
    from pipelines.model_access import ModelIdentity, RunModels
    from prompts import prompt_versions

    version = prompt_versions()["query_generation"]

    def llm_entry(key, model="m", prompt_version=version):
        return {"key": key, "model_id": model, "model_version": model, "prompt_name": "query_generation",
                "prompt_version": prompt_version, "response_json": "{}", "raw_answer": "{}", "input_tokens": 10,
                "output_tokens": 7}

    def embedding_entry(key, model="t", task_type="RETRIEVAL_QUERY"):
        return {"key": key, "model_id": model, "model_version": model, "task_type": task_type, "dimension": 2,
                "text_sha256": "0" * 64, "embedding": [0.0, 1.0]}

    write_cache_file(str(tmp_path), LLM_CACHE, [
        llm_entry("k1"), llm_entry("other-model", model="m2"), llm_entry("old-prompt", prompt_version="0-old")])
    write_cache_file(str(tmp_path), EMBEDDING_CACHE, [
        embedding_entry("e1"), embedding_entry("e2", task_type="CLASSIFICATION"), embedding_entry("other", model="t2")])
    # A file of the layout before partitions, not yet moved (a dry run moves nothing): still counted.
    pq.write_table(pa.Table.from_pylist([llm_entry("flat")], schema=LLM_CACHE_ENTRY),
                   tmp_path / LLM_CACHE / "flat.parquet")

    index = CacheIndex.read(str(tmp_path), RunModels(ModelIdentity("m", "m"), ModelIdentity("t", "t")))
    assert set(index.llm_entries) == {"k1", "flat"} and index.embedding_keys == {"e1", "e2"}
    assert index.output_tokens == {("m", "query_generation"): [7, 7]}
    assert CacheIndex.read(None, RunModels(ModelIdentity("m", "m"), ModelIdentity("t", "t"))).llm_entries == {}
