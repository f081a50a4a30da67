"""`embforge run` as a user runs it, through the CLI: twice over, and with a bad setting over a finished run.

The LLM and the teacher are the fake Gemini server (fast, and it counts every request); the student is the packaged
MiniLM, trained for two steps. One run is made per module and copied for each test, so each test starts from a
finished run of its own.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from pipelines.cli import main
from tests.fakes.gemini_server import FakeGeminiServer
from tests.test_pipeline_e2e import CORPUS, KEY, scripted_gemini, write_gemini_toml

#: Passages whose every request succeeds at the first ask, so a re-run has nothing left to ask.
CLEAN_CORPUS = [(passage_id, text) for passage_id, text in CORPUS if "[" not in text]

pytestmark = pytest.mark.slow


def _write_config(folder, server) -> str:
    corpus = folder / "passages.jsonl"
    corpus.write_text("".join(json.dumps({"id": pid, "text": text}) + "\n" for pid, text in CLEAN_CORPUS))
    return write_gemini_toml(folder / "run.toml", server, cache_dir=folder / "cache", corpus=corpus, k=4,
                             num_negatives=2, more=f"""
[train]
# --output wins over these: `embforge run --output DIR` puts everything under DIR.
output_dir = "{folder / 'elsewhere' / 'student'}"
max_steps = 2
batch_size = 4
max_seq_length = 32
progress = false
checkpoint_every = 0
[evaluate]
output = "{folder / 'elsewhere' / 'report'}"
dims = [384, 64]
int8 = false
holdout_fraction = 0.3
""")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """(fake server, config path, run directory) after one successful `embforge run`."""
    folder = tmp_path_factory.mktemp("cli-run")
    with pytest.MonkeyPatch.context() as patch, FakeGeminiServer(generate=scripted_gemini) as server:
        patch.setenv("GEMINI_API_KEY", KEY)
        config = _write_config(folder, server)
        output = str(folder / "first")
        assert main(["run", "--config", config, "--output", output]) == 0
        yield server, config, output


def _copy(run: str, tmp_path) -> str:
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    return copy


def _fingerprint(run: str) -> dict:
    """What a user would call the run's results: manifest id, student weights, report."""
    with open(os.path.join(run, "manifest.json"), encoding="utf-8") as handle:
        run_id = json.load(handle)["run_id"]
    weights = load_file(os.path.join(run, "student", "model", "model.safetensors"))
    with open(os.path.join(run, "report", "report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    return {"run_id": run_id, "weights": {name: value.sum().item() for name, value in weights.items()},
            "report": report["created"], "report_results": report["results"]}


def test_running_twice_makes_no_new_calls_and_replaces_student_and_report(finished_run, tmp_path, capsys):
    server, config, first = finished_run
    run = _copy(first, tmp_path)
    # Everything lands under --output: dataset, student, report, log.
    for entry in ("manifest.json", "triplets", "student/model/modules.json", "report/report.md", "embforge.log"):
        assert os.path.exists(os.path.join(run, entry)), entry
    assert not os.path.exists(os.path.join(os.path.dirname(first), "elsewhere"))
    before = {name: os.stat(os.path.join(run, name)).st_ino
              for name in ("manifest.json", "student/model/model.safetensors", "report/report.json")}
    capsys.readouterr()
    server.reset()

    assert main(["run", "--config", config, "--output", run]) == 0
    assert server.requests == [], "the second run asked the server again"
    with open(os.path.join(run, "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    assert manifest["cache"].get("llm_calls", 0) == 0 and manifest["cache"]["embeddings_computed"] == 0
    # New files, not the old ones left in place: the student was trained again and the report written again.
    after = {name: os.stat(os.path.join(run, name)).st_ino for name in before}
    assert all(after[name] != before[name] for name in before), (before, after)
    assert not [name for name in os.listdir(run) if "staging" in name]
    # The student was trained reading 32 tokens, but both models are compared at the one window the report states.
    with open(os.path.join(run, "report", "report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    assert {info["max_seq_length"] for info in report["models"].values()} == {256}
    # The console shows embforge's summary; the libraries' lines went to the log file only.
    console = capsys.readouterr().err
    assert "stage balance" in console and "report:" in console
    assert "apache_beam" not in console and "sentence_transformers" not in console
    with open(os.path.join(run, "embforge.log"), encoding="utf-8") as handle:
        log = handle.read()
    assert "apache_beam" in log and "stage balance" in log


@pytest.mark.parametrize("bad_setting, message", [
    ("generate.corpus.path={missing}/corpus.jsonl", "corpus"),
    ("generate.counterfactuals.task_spec={missing}/task.yaml", "task.yaml"),
    ("train.student={missing}/student-model", "student-model"),
    ("generate.mining.k=0", "generate.mining: MineNegativesConfig: k must be >= 1"),
], ids=["corpus", "task-spec", "student", "config"])
def test_a_run_that_fails_at_construction_leaves_the_earlier_run_untouched(finished_run, tmp_path, capsys,
                                                                           bad_setting, message):
    server, config, first = finished_run
    run = _copy(first, tmp_path)
    before = _fingerprint(run)
    server.reset()
    setting = bad_setting.format(missing=tmp_path / "missing")
    assert main(["run", "--config", config, "--output", run, "--set", setting]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("embforge: error:") and message in error, error
    assert server.requests == []
    assert _fingerprint(run) == before
