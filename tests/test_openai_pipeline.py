"""The whole generation pipeline on the OpenAI-compatible backend (fake chat-completions server), the teacher on the
fake Gemini server: the same rows as the Gemini LLM gives for the same answers, a balanced manifest, no second call
for a cached answer, and the budget at a configured price."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import replace

import pytest

from pipelines.clients.specs import LLMSpec
from pipelines.config import BudgetConfig
from pipelines.run import generate
from tests.fakes.openai_server import FakeOpenAIServer
from tests.test_pipeline_e2e import (  # noqa: F401 - `gemini` is a fixture used by name
    CORPUS,
    check_run,
    gemini,
    gemini_config,
    read_kind,
    scripted_gemini,
)

pytestmark = pytest.mark.slow

OPENAI_KEY = "sk-sentinel-openai-key-for-e2e"


def scripted_openai(body) -> str:
    """The Gemini e2e script's answers (tests/test_pipeline_e2e.py), read from a chat-completions body."""
    messages = body["messages"]
    system = next(message["content"] for message in messages if message["role"] == "system")
    user = messages[-1]["content"]
    return scripted_gemini({"systemInstruction": {"parts": [{"text": system}]},
                            "contents": [{"parts": [{"text": user}]}]})


def _openai_config(tmp_path, gemini, server, folder: str, corpus_rows=CORPUS):
    config = gemini_config(tmp_path / folder, gemini, corpus_rows=corpus_rows)
    llm = LLMSpec(backend="openai", model="served-model", base_url=server.base_url, backoff_initial_s=0.01,
                  backoff_max_s=0.05, timeout_s=5.0)
    return replace(config, llm=llm)


def _rows(run_dir: str, kind: str, *fields: str) -> set[tuple]:
    return {tuple(json.dumps(row[field]) for field in fields) for row in read_kind(run_dir, kind)}


def test_the_openai_backend_runs_every_llm_stage_like_gemini_and_reruns_from_cache(tmp_path, gemini, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    for folder in ("gemini", "openai"):
        (tmp_path / folder).mkdir()
    reference = gemini_config(tmp_path / "gemini", gemini)
    generate(reference)
    with FakeOpenAIServer(answer=scripted_openai, api_key=OPENAI_KEY) as server:
        config = _openai_config(tmp_path, gemini, server, "openai")
        manifest = generate(config)
        check_run(config.output, manifest)
        # Every LLM stage asked the OpenAI-compatible server (none asked Gemini's generateContent).
        usage = {row["stage"]: row for row in manifest["llm_usage"]}
        assert {"generate_queries", "grade_relevance", "mine_negatives", "generate_counterfactuals"} <= set(usage)
        assert all(row["calls"] > 0 for row in usage.values())
        assert sum(row["calls"] for row in usage.values()) == len(
            {json.dumps(record.body, sort_keys=True) for record in server.requests})
        for kind, fields in (("pairs", ("query", "passage_id")), ("triplets", ("query", "positive_id", "negative_ids")),
                             ("classification", ("text", "label")), ("rejected", ("record_id", "reason"))):
            assert _rows(config.output, kind, *fields) == _rows(reference.output, kind, *fields), kind

        # Again: only the answers that failed (never cached) are asked again.
        server.reset()
        second = generate(config)
        failed = {row["record_id"] for row in read_kind(config.output, "rejected") if row["reason"] == "llm_failed"}
        assert len(server.requests) == len(failed) * config.llm.max_parse_attempts
        assert second["outputs"] == manifest["outputs"]
        check_run(config.output, second)

    for path in glob.glob(os.path.join(tmp_path, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                assert OPENAI_KEY.encode() not in handle.read(), path


def test_a_configured_price_makes_the_budget_apply_to_a_self_hosted_model(tmp_path, gemini):
    clean = [(pid, text) for pid, text in CORPUS if "[" not in text]
    with FakeOpenAIServer(answer=scripted_openai) as server:
        config = _openai_config(tmp_path, gemini, server, ".", corpus_rows=clean)
        priced = replace(config.llm, usd_per_million_tokens=(100.0, 100.0))
        config = replace(config, llm=priced, counterfactuals=None, budget=BudgetConfig(max_cost_usd=1.0))
        manifest = generate(config)
    check_run(config.output, manifest)
    queries = {row["stage"]: row for row in manifest["llm_usage"]}["generate_queries"]
    assert 0 < queries["calls"] < len(clean) and queries["skipped_by_budget"] == len(clean) - queries["calls"]
    assert sum(row["estimated_cost_usd"] for row in manifest["llm_usage"]) <= 1.0
