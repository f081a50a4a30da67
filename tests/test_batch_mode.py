"""Batch mode: every LLM stage's misses as Gemini Batch API jobs, through google-genai against the fake server's Files
and Batch APIs (tests/fakes/gemini_batch_server.py).

- The end-to-end configuration in batch mode, some lines failing inside the jobs: the run completes, balances, and its
  rows equal the online run's for the same fake answers; batch answers cost half.
- A run killed while waiting on its jobs, run again, waits on the same jobs: the server sees no second job.
- An expired job's requests are asked online: nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from pipelines.batch_calls import JobRecord, job_group, keys_digest, read_record, record_path, write_record
from pipelines.clients.base import GenerationConfig
from pipelines.clients.gemini import GeminiError
from pipelines.clients.gemini_batch import (
    GeminiBatchClient,
    embed_request_line,
    generate_request_line,
    line_error,
    read_result_lines,
)
from pipelines.clients.specs import BatchSettings, EmbedderSpec, LLMSpec
from pipelines.config import load_run_config
from pipelines.config_loading import ConfigError
from pipelines.run import generate
from prompts import get_prompt
from tests.fakes.gemini_batch_server import BatchPlan
from tests.fakes.gemini_server import FakeGeminiServer
from tests.test_pipeline_e2e import KEY, check_run, gemini_config, keyword_vector, read_kind, scripted_gemini

#: Polls a few milliseconds apart: the fake server finishes a job after BatchPlan.polls looks.
FAST_POLLS = {"batch": BatchSettings(poll_initial_s=0.01, poll_max_s=0.02, max_wait_s=30.0)}


def _batch(config):
    return replace(config, llm=replace(config.llm, mode="batch", **FAST_POLLS),
                   teacher=replace(config.teacher, mode="batch", **FAST_POLLS))


def _rows(run_dir: str, kind: str, *fields: str) -> set[tuple]:
    return {tuple(json.dumps(row[field]) for field in fields) for row in read_kind(run_dir, kind)}


# --- pure parts 


def test_a_request_line_carries_what_the_online_request_does():
    prompt = get_prompt("relevance_grading")
    messages = prompt.render(query="what is a heap", passage="A heap keeps the smallest item first.")
    line = generate_request_line("k1", messages, prompt.output_model, GenerationConfig(0.2, 64, seed=5),
                                 "gemini-2.5-flash", 0)
    request = line["request"]
    assert line["key"] == "k1"
    assert request["systemInstruction"]["parts"][0]["text"] == messages[0].content
    assert [content["role"] for content in request["contents"]][-1] == "user"
    config = request["generationConfig"]
    assert config["responseJsonSchema"] == prompt.output_model.model_json_schema()
    assert (config["temperature"], config["seed"], config["thinkingConfig"]) == (0.2, 5, {"thinkingBudget": 0})
    assert embed_request_line("e", "text", "RETRIEVAL_QUERY", None)["request"] == {
        "content": {"parts": [{"text": "text"}]}, "taskType": "RETRIEVAL_QUERY"}


def test_result_lines_are_read_by_key_and_bad_lines_are_named():
    lines = read_result_lines(b'{"key": "a", "response": {}}\n\n{"key": "b", "error": {"code": 500, "message": "x"}}\n')
    assert set(lines) == {"a", "b"} and line_error(lines["a"]) is None
    assert line_error(lines["b"]) == "batch line failed: 500 x" and line_error(None).startswith("the job's results")
    with pytest.raises(GeminiError, match="line 2: not JSON"):
        read_result_lines(b'{"key": "a", "response": {}}\n{"key": \n')


def test_misses_go_to_the_unfinished_job_holding_them_else_to_a_job_chosen_by_their_key():
    keys = [hashlib.sha256(str(index).encode()).hexdigest() for index in range(64)]
    groups = {key: job_group(key, {}, len(keys), 10) for key in keys}
    # ceil(64 / 10) = 7 new jobs, each miss in one by its key: the same split in every run of the same misses.
    assert set(groups.values()) <= {f"new/{index}" for index in range(7)} and len(set(groups.values())) >= 5
    assert all(job_group(key, {}, len(keys), 10) == group for key, group in groups.items())
    assert job_group(keys[3], {keys[3]: "abc"}, len(keys), 10) == "job/abc"
    assert keys_digest(["b", "a"]) == keys_digest(["a", "b"])


def test_a_job_record_round_trips_and_is_replaced_whole(tmp_path):
    record = JobRecord(name="batches/1", stage="generate_queries", digest="d1", keys=["a", "b"])
    write_record(str(tmp_path), record)
    write_record(str(tmp_path), replace(record, state="done"))
    assert read_record(record_path(str(tmp_path), "d1")) == replace(record, state="done")
    assert [path.name for path in (tmp_path / "batch_jobs").iterdir()] == ["d1.json"]


def test_batch_mode_needs_the_gemini_backend():
    with pytest.raises(ConfigError, match="needs backend 'gemini'"):
        load_run_config(None, ["generate.llm.mode=batch"])
    with pytest.raises(ValueError, match="needs backend 'gemini'"):
        EmbedderSpec(mode="batch")
    assert LLMSpec(backend="gemini", mode="batch").mode == "batch"


def test_the_batch_client_waits_for_a_job_and_reads_its_results(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    prompt = get_prompt("relevance_grading")
    with FakeGeminiServer(batch_plan=BatchPlan(polls=3, line_errors=0.5, seed=1)) as server:
        settings = BatchSettings(poll_initial_s=0.01, poll_max_s=0.02, max_wait_s=10)
        client = GeminiBatchClient("gemini-2.5-flash", _endpoint(server), settings)
        lines = [generate_request_line(f"k{index}", prompt.render(query=f"q{index}", passage="p"),
                                       prompt.output_model, GenerationConfig(), "gemini-2.5-flash", 0)
                 for index in range(8)]
        name = client.submit(lines, "embforge-test")
        slept = []
        job = client.wait(name, sleep=slept.append)
        results = client.results(job)
        client.close()
    assert len(slept) == 2 and slept[1] >= slept[0]  # PENDING, RUNNING, then done: backed off between looks
    assert set(results) == {f"k{index}" for index in range(8)}
    failed = [key for key, line in results.items() if line_error(line)]
    assert 0 < len(failed) < 8 and server.batch.jobs[name].failed_lines == len(failed)


def _endpoint(server):
    from pipelines.clients.gemini import GeminiEndpoint

    return GeminiEndpoint(base_url=server.base_url, timeout_s=5.0)


# --- whole runs -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_llm_stage_in_batch_mode_gives_the_online_rows_at_half_the_cost(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    results = {}
    for mode in ("online", "batch"):
        (tmp_path / mode).mkdir()
        plan = BatchPlan(line_errors=0.25, seed=3)
        with FakeGeminiServer(generate=scripted_gemini, embed=keyword_vector, batch_plan=plan) as server:
            config = gemini_config(tmp_path / mode, server)
            config = _batch(config) if mode == "batch" else config
            manifest = generate(config)
            check_run(config.output, manifest)
            results[mode] = (config, manifest, server.batch.jobs, [record.method for record in server.requests])
    online_config, online, _, _ = results["online"]
    batch_config, batch, jobs, online_methods = results["batch"]
    for kind, fields in (("pairs", ("query", "passage_id")), ("triplets", ("query", "positive_id", "negative_ids")),
                         ("classification", ("text", "label")), ("rejected", ("record_id", "reason"))):
        assert _rows(batch_config.output, kind, *fields) == _rows(online_config.output, kind, *fields), kind
    # Every LLM stage and the teacher went through jobs; failed lines were asked online, and only those.
    stages = {job["stage"] for job in batch["batch_jobs"]}
    assert {"generate_queries", "grade_relevance", "mine_negatives", "generate_counterfactuals",
            "embed_teacher"} <= stages
    assert all(job["state"] == "JOB_STATE_SUCCEEDED" for job in batch["batch_jobs"])
    assert len(jobs) == len(batch["batch_jobs"])
    failed = sum(job["failed_lines"] for job in batch["batch_jobs"])
    assert failed == sum(job.failed_lines for job in jobs.values()) > 0
    assert sum(job["asked_online"] for job in batch["batch_jobs"]) >= failed
    assert online_methods.count("generateContent") > 0  # the failed lines' online asks
    assert batch["estimated_cost_usd"] < 0.75 * online["estimated_cost_usd"]
    assert online["batch_jobs"] == []


@pytest.mark.slow
def test_a_run_killed_while_waiting_resumes_its_jobs_and_creates_no_second_one(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    with FakeGeminiServer(generate=scripted_gemini, embed=keyword_vector, batch_plan=BatchPlan(polls=2)) as server:
        config = _batch(gemini_config(tmp_path, server))
        config = replace(config, counterfactuals=None, teacher=replace(config.teacher, mode="online"))
        original_wait = GeminiBatchClient.wait

        def killed(self, name, sleep=None):
            raise RuntimeError("killed while waiting on " + name)

        monkeypatch.setattr(GeminiBatchClient, "wait", killed)
        with pytest.raises(Exception, match="killed while waiting"):
            generate(config)
        created = dict(server.batch.jobs)
        assert len(created) == 1  # query generation's job, recorded before the kill
        monkeypatch.setattr(GeminiBatchClient, "wait", original_wait)
        manifest = generate(config)
        check_run(config.output, manifest)
    queries = next(job for job in manifest["batch_jobs"] if job["stage"] == "generate_queries")
    assert queries["name"] in created  # the first run's job, polled and read, not created again
    assert sum(1 for job in server.batch.jobs.values() if job.method == "batchGenerateContent"
               and job.input_file == created[queries["name"]].input_file) == 1
    assert len(server.batch.jobs) == len(manifest["batch_jobs"])


@pytest.mark.slow
def test_an_expired_jobs_requests_are_asked_online(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    plan = BatchPlan(final_state="BATCH_STATE_EXPIRED")
    with FakeGeminiServer(generate=scripted_gemini, embed=keyword_vector, batch_plan=plan) as server:
        config = _batch(gemini_config(tmp_path, server))
        config = replace(config, counterfactuals=None)
        manifest = generate(config)
    check_run(config.output, manifest)
    assert manifest["batch_jobs"] and all(job["state"] == "JOB_STATE_EXPIRED" for job in manifest["batch_jobs"])
    assert all(job["asked_online"] == job["requests"] for job in manifest["batch_jobs"])
    assert manifest["outputs"]["triplets"] > 0
