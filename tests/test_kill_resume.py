"""Kill and resume: SIGKILL `embforge generate` during the LLM stage, run it again with the same inputs.

The re-run completes, every answer paid for before the kill comes from the cache (only the rest reach the server),
and the outputs hold no duplicates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_schemas import TRIPLET, stage_balances
from pipelines.cache import LLM_CACHE, cache_files, read_cache_file
from pipelines.run_layout import read_kind
from tests.fakes.gemini_server import FakeGeminiServer, FaultPlan
from tests.test_pipeline_e2e import keyword_vector, write_gemini_toml

PASSAGES = 48
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _answer(body) -> str:
    passage = body["contents"][-1]["parts"][0]["text"].split("<passage>")[1].split("</passage>")[0].split()
    return json.dumps({"task": "Given a keyword, retrieve passages about it", "query": passage[0]})


def _generate(config_path: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "generate", "--config", config_path], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_during_llm_stage_then_rerun_completes_from_cache(tmp_path):
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{index}", "text": f"topic{index} " + "word " * 12}) + "\n"
                              for index in range(PASSAGES)))
    cache_dir, output = tmp_path / "cache", tmp_path / "run"
    # Slow answers give the kill a window inside the LLM stage.
    with FakeGeminiServer(generate=_answer, embed=keyword_vector, faults=FaultPlan(latency_s=0.3)) as server:
        config = write_gemini_toml(tmp_path / "run.toml", server, output=output, cache_dir=cache_dir, corpus=corpus,
                                   llm_concurrency=2)
        env = {**os.environ, "GEMINI_API_KEY": "sentinel-kill-key", "HF_HUB_OFFLINE": "1"}
        first = _generate(config, env)
        deadline = time.monotonic() + 240
        while not cache_files(str(cache_dir), LLM_CACHE):
            assert first.poll() is None, f"generate ended before the kill: {first.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no LLM answer was cached in time"
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
        paid = {row["key"] for path in cache_files(str(cache_dir), LLM_CACHE)
                for row in read_cache_file(path, LLM_CACHE).to_pylist()}
        assert 0 < len(paid) < PASSAGES, "the kill should land inside the LLM stage"

        # Requests the killed process had in flight still finish on the server; let them, then count afresh.
        while server.in_flight:
            assert time.monotonic() < deadline, "the server never drained"
            time.sleep(0.05)
        server.reset()
        second = _generate(config, env)
        _, stderr = second.communicate(timeout=600)
        assert second.returncode == 0, stderr.decode()[-3000:]
        resent = [request for request in server.requests if request.method == "generateContent"]
        assert len(resent) == PASSAGES - len(paid), "answers paid for before the kill were asked again"

    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["balanced"] and all(stage_balances(stage) for stage in manifest["stages"])
    assert manifest["llm_usage"][0]["cache_hits"] == len(paid)
    triplets = read_kind(str(output), "triplets", TRIPLET).to_pylist()
    query_ids = [row["query_id"] for row in triplets]
    assert len(query_ids) == len(set(query_ids)) == manifest["outputs"]["triplets"], "duplicate or missing triplets"
