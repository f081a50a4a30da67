"""The run's budget through a whole `generate`: --max-llm-calls and --max-cost stop new calls across every LLM
stage, the skipped rows are accounted for, the shards stay valid, and a later run without the budget pays only for
what was skipped. --max-cost holds what the server bills even when answers are asked again, and caps the teacher's
embeddings too."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import replace
from fractions import Fraction

import pytest

from pipelines.cli import main
from pipelines.clients.base import Usage
from pipelines.clients.specs import LLMSpec
from pipelines.config import BudgetConfig
from pipelines.pricing import estimated_cost_micro_usd
from pipelines.run import generate
from tests.fakes.backends import ScriptedLLM
from tests.fakes.gemini_server import FakeGeminiServer
from tests.test_pipeline_e2e import (  # noqa: F401 - gemini is a fixture
    CORPUS,
    KEY,
    check_run,
    gemini,
    gemini_config,
    keyword_vector,
    read_kind,
    scripted_gemini,
    write_gemini_toml,
)

# Every test here runs the whole generation pipeline.
pytestmark = pytest.mark.slow

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
    # A query-generation call is planned at ~$0.0012 here: up to 3 asks (max_parse_attempts), each a ~2 kB prompt and
    # 96 output tokens at gemini-2.5-flash prices. So $0.0015 allows some of the 6 calls, not all.
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
    spent = sum(estimated_cost_micro_usd(LLMSpec(backend="gemini"), Usage(record.prompt_tokens, record.output_tokens))
                for record in billed)
    assert 0 < spent <= max_cost * 1_000_000
    assert sum(row["estimated_cost_usd"] for row in manifest["llm_usage"]) <= max_cost
    skipped = [row for row in read_kind(str(tmp_path / "run"), "rejected") if row["reason"] == "skipped_by_budget"]
    assert len(skipped) == queries["skipped_by_budget"]


#: List prices of gemini-2.5-flash (input, output) and gemini-embedding-001, in micro-USD per token, exact.
FLASH_INPUT, FLASH_OUTPUT, EMBEDDING_INPUT = Fraction(3, 10), Fraction(5, 2), Fraction(3, 20)


def _bytes_over_3(text: str) -> int:
    """A tokenizer at the budget's bound: one token per 3 bytes of UTF-8, the most tokens it assumes a text holds."""
    return len(text.encode()) // 3


def _embedded_texts(server) -> list[str]:
    return [text for record in server.requests if record.method != "generateContent" and record.status == 200
            for text in record.texts]


def _server_spend_micro_usd(server) -> Fraction:
    """What the server's answers cost at list prices, exactly: the usageMetadata of every generateContent answer, and
    every text embedded at bytes / 3 tokens rounded up (the embedding API reports no token counts)."""
    generated = [record for record in server.requests if record.method == "generateContent"]
    llm = sum(FLASH_INPUT * record.prompt_tokens + FLASH_OUTPUT * record.output_tokens for record in generated)
    return llm + sum(EMBEDDING_INPUT * -(-len(text.encode()) // 3) for text in _embedded_texts(server))


class FirstAskCutOff:
    """Answers like `scripted_gemini`, except that the first ask of every prompt runs to its max_output_tokens with
    text that is not JSON (a model cut off mid-answer): every call is asked again, and its first ask is billed at the
    output cap."""

    def __init__(self):
        self._lock = threading.Lock()
        self._asks: Counter[str] = Counter()

    def __call__(self, body) -> str:
        prompt = json.dumps([body.get("systemInstruction"), body["contents"]], sort_keys=True)
        with self._lock:
            ask = self._asks[prompt]
            self._asks[prompt] += 1
        if ask == 0:
            return "x" * (3 * body["generationConfig"]["maxOutputTokens"])
        return scripted_gemini(body)


@pytest.fixture
def reasked_gemini(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    with FakeGeminiServer(generate=FirstAskCutOff(), embed=keyword_vector, count_tokens=_bytes_over_3) as server:
        yield server


def test_max_cost_holds_what_the_server_bills_when_answers_are_asked_again(tmp_path, reasked_gemini):
    # Every call is asked twice and billed for both asks. A query-generation call is planned at 3 asks (~$0.0012: a
    # ~2 kB prompt and 96 output tokens each) and billed ~$0.00065, so $0.003 allows part of the work. Planned at one
    # ask (~$0.0004), all 6 query calls would go out and the server would bill ~$0.0039.
    max_cost = 0.003
    config = replace(gemini_config(tmp_path, reasked_gemini, corpus_rows=CLEAN_CORPUS),
                     budget=BudgetConfig(max_cost_usd=max_cost))
    manifest = generate(config)
    check_run(config.output, manifest)

    billed = _server_spend_micro_usd(reasked_gemini)
    assert 0 < billed <= max_cost * 1_000_000, f"the server billed {float(billed):.0f} micro-USD"
    usage = _usage_by_stage(manifest)
    calls = sum(row["calls"] for row in usage.values())
    assert 0 < usage["generate_queries"]["calls"] < len(CLEAN_CORPUS)
    generated = [record for record in reasked_gemini.requests if record.method == "generateContent"]
    assert len(generated) == 2 * calls, "every call was asked again"

    # The manifest prices the same answers and texts, each call's and each text's cost rounded up to a micro-dollar.
    texts = len(_embedded_texts(reasked_gemini))
    embedding = manifest["embedding_usage"]
    # EmbedTeacher's texts, then the counterfactual label judge's (descriptions, seeds and judged texts).
    assert [row["stage"] for row in embedding] == ["embed_teacher", "generate_counterfactuals.label_judge"]
    assert sum(row["texts_embedded"] for row in embedding) == texts > 0
    total = round(manifest["estimated_cost_usd"] * 1_000_000)
    by_stage = sum(row["estimated_cost_usd"] for row in [*usage.values(), *embedding])
    assert total == round(by_stage * 1_000_000)
    assert billed <= total <= billed + calls + texts
    assert manifest["estimated_cost_usd"] <= max_cost

    # What the budget left uncalled is a rejected row, counted in the manifest.
    rejected = read_kind(config.output, "rejected")
    skipped = Counter(row["stage"] for row in rejected if row["reason"] == "skipped_by_budget")
    assert skipped["generate_queries"] > 0
    for stage in ("generate_queries", "grade_relevance", "generate_counterfactuals"):
        assert skipped[stage] == usage[stage]["skipped_by_budget"], stage
    reasons = {stage["stage"]: stage["reasons"] for stage in manifest["stages"]}
    assert all(reasons[stage].get("skipped_by_budget", 0) == count for stage, count in skipped.items())


def free_scripted_llm() -> ScriptedLLM:
    """Factory for a custom LLM backend answering like `scripted_gemini`. No price is listed for it, so it costs
    nothing: only the teacher's embeddings draw on a cost budget."""

    def respond(messages, output_model) -> str:
        system = next(message.content for message in messages if message.role == "system")
        return scripted_gemini({"systemInstruction": {"parts": [{"text": system}]},
                                "contents": [{"parts": [{"text": messages[-1].content}]}]})

    return ScriptedLLM(respond)


def test_max_cost_caps_the_teachers_embeddings(tmp_path, gemini):
    # The 12 texts (6 passages, 6 queries) hold 49 tokens at bytes / 3, ~$0.0000074 at list price; the budget counts
    # each text rounded up to a whole micro-dollar ($0.000016 in all), so $0.000004 embeds a few of them.
    max_cost = 0.000004
    config = replace(gemini_config(tmp_path, gemini, corpus_rows=CLEAN_CORPUS),
                     llm=LLMSpec(backend="custom", model="tests.test_budget:free_scripted_llm"),
                     budget=BudgetConfig(max_cost_usd=max_cost))
    manifest = generate(config)
    check_run(config.output, manifest)

    billed = _server_spend_micro_usd(gemini)
    assert 0 < billed <= max_cost * 1_000_000, f"the server embedded {float(billed):.2f} micro-USD worth of text"
    rejected = read_kind(config.output, "rejected")
    unembedded = [json.loads(row["payload"]) for row in rejected if row["stage"] == "embed_teacher"]
    stage = next(stage for stage in manifest["stages"] if stage["stage"] == "embed_teacher")
    assert stage["reasons"] == {"skipped_by_budget": len(unembedded)}
    assert 0 < len(unembedded) < stage["input"]

    # The server embedded the texts the budget allowed, each once, and nothing else.
    sent = _embedded_texts(gemini)
    assert len(sent) == len(set(sent)) == stage["kept"]
    assert set(sent).isdisjoint(item["text"] for item in unembedded)
    usage = manifest["embedding_usage"][0]
    assert (usage["texts_embedded"], usage["skipped_by_budget"]) == (len(sent), len(unembedded))
    assert usage["estimated_input_tokens"] == sum(-(-len(text.encode()) // 3) for text in sent)
    assert 0 < usage["estimated_cost_usd"] == manifest["estimated_cost_usd"] <= max_cost
    # The LLM costs nothing, and embeddings are not LLM calls: every LLM request was called or cached.
    assert all(row["skipped_by_budget"] == 0 for row in manifest["llm_usage"])

    # A query without a vector fails the round trip; so does the query of a passage without one (it cannot be found).
    failed = {row["record_id"] for row in rejected
              if row["stage"] == "grade_relevance" and row["reason"] == "roundtrip_failed"}
    expected = {item["id"] if item["task_type"] == "RETRIEVAL_QUERY" else f"{item['id']}::q0" for item in unembedded}
    assert failed == expected
