"""The run's LLM budget through a whole `generate`: --max-llm-calls and --max-cost stop new calls across every LLM
stage, the skipped rows are accounted for, the shards stay valid, and a later run without the budget pays only for
what was skipped."""

from __future__ import annotations

import json
from dataclasses import replace

from pipelines.cli import main
from pipelines.clients.base import Usage
from pipelines.config import BudgetConfig
from pipelines.pricing import estimated_cost_micro_usd
from pipelines.run import generate
from tests.test_pipeline_e2e import (  # noqa: F401 - gemini is a fixture
    CORPUS,
    check_run,
    gemini,
    gemini_config,
    read_kind,
    write_gemini_toml,
)

#: Passages without markers: every answer parses the first time, so one call is one request on the server.
CLEAN_CORPUS = [(passage_id, text) for passage_id, text in CORPUS if "[" not in text]


def _generate_requests(server) -> list[dict]:
    return [record.body for record in server.requests if record.method == "generateContent"]


def _usage_by_stage(manifest: dict) -> dict[str, dict]:
    return {row["stage"]: row for row in manifest["llm_usage"]}


def test_max_llm_calls_caps_the_whole_run_and_a_rerun_pays_only_for_the_rest(tmp_path, gemini):
    passages = len(CLEAN_CORPUS)
    # Query generation takes one call per passage; the budget leaves 3 for grading and none for the later stages.
    max_calls = passages + 3
    config = gemini_config(tmp_path, gemini, corpus_rows=CLEAN_CORPUS)
    budgeted = replace(config, budget=BudgetConfig(max_llm_calls=max_calls))
    manifest = generate(budgeted)
    check_run(budgeted.output, manifest)

    usage = _usage_by_stage(manifest)
    assert sum(row["calls"] for row in usage.values()) == max_calls
    assert len(_generate_requests(gemini)) == max_calls, "the server saw more calls than the budget allows"
    assert usage["generate_queries"]["calls"] == passages and usage["generate_queries"]["skipped_by_budget"] == 0
    assert usage["grade_relevance"]["calls"] == 3
    assert usage["grade_relevance"]["skipped_by_budget"] == passages - 3
    assert usage["mine_negatives"]["calls"] == 0 and usage["mine_negatives"]["skipped_by_budget"] > 0
    assert usage["generate_counterfactuals"]["calls"] == 0
    assert usage["generate_counterfactuals"]["skipped_by_budget"] > 0
    assert manifest["budget"] == {"max_llm_calls": float(max_calls)}

    skipped = [row for row in read_kind(budgeted.output, "rejected") if row["reason"] == "skipped_by_budget"]
    by_stage = {stage: sum(row["stage"] == stage for row in skipped)
                for stage in ("grade_relevance", "generate_counterfactuals")}
    assert by_stage == {"grade_relevance": passages - 3,
                        "generate_counterfactuals": usage["generate_counterfactuals"]["skipped_by_budget"]}
    # What was done is written: the 3 graded pairs. Mining's LLM check of their candidates was not paid for, so no
    # candidate is confirmed as a negative and each pair is rejected saying so (not silently dropped).
    assert len(read_kind(budgeted.output, "pairs")) == 3
    mining = [row for row in read_kind(budgeted.output, "rejected") if row["stage"] == "mine_negatives"]
    assert len(mining) == 3 and all("not called (LLM budget spent)" in row["detail"] for row in mining)

    # Without the budget: the calls paid for come from the cache, and only the skipped requests reach the server.
    first_bodies = [json.dumps(body, sort_keys=True) for body in _generate_requests(gemini)]
    gemini.reset()
    unbudgeted = generate(config)
    check_run(config.output, unbudgeted)
    second_bodies = [json.dumps(body, sort_keys=True) for body in _generate_requests(gemini)]
    assert second_bodies and not set(first_bodies) & set(second_bodies)
    assert sum(row["cache_hits"] for row in unbudgeted["llm_usage"]) == max_calls
    assert sum(row["skipped_by_budget"] for row in unbudgeted["llm_usage"]) == 0


def test_max_cost_stops_new_calls_before_the_estimated_spend_passes_it(tmp_path, gemini, capsys):
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text("".join(json.dumps({"id": pid, "text": text}) + "\n" for pid, text in CLEAN_CORPUS))
    toml = write_gemini_toml(tmp_path / "run.toml", gemini, output=tmp_path / "run", cache_dir=tmp_path / "cache",
                             corpus=corpus)
    # A query-generation call costs at most ~$0.0005 here (a ~2 kB prompt, 96 output tokens at gemini-2.5-flash
    # prices), so $0.0015 allows a few of the 6 calls, not all.
    max_cost = 0.0015
    assert main(["generate", "--config", toml, "--max-cost", str(max_cost)]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    check_run(str(tmp_path / "run"), manifest)

    queries = _usage_by_stage(manifest)["generate_queries"]
    assert 0 < queries["calls"] < len(CLEAN_CORPUS)
    assert queries["skipped_by_budget"] == len(CLEAN_CORPUS) - queries["calls"]
    assert manifest["budget"] == {"max_cost_usd": max_cost}
    # What the server billed (its usageMetadata), priced independently of the manifest, stays within the budget.
    billed = [record for record in gemini.requests if record.method == "generateContent"]
    assert len(billed) == queries["calls"]
    spent = sum(estimated_cost_micro_usd("gemini-2.5-flash", Usage(record.prompt_tokens, record.output_tokens))
                for record in billed)
    assert 0 < spent <= max_cost * 1_000_000
    assert sum(row["estimated_cost_usd"] for row in manifest["llm_usage"]) <= max_cost
    skipped = [row for row in read_kind(str(tmp_path / "run"), "rejected") if row["reason"] == "skipped_by_budget"]
    assert len(skipped) == queries["skipped_by_budget"]
