"""The command line as a user meets it: options that are neither embforge's nor Beam's stop the command, and every
user error is one line without a traceback, with exit status 2 (1 for a run that failed for another reason)."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from pipelines.cli import describe_error, main, parse_arguments
from pipelines.config import load_run_config
from tests.fakes.gemini_server import FakeGeminiServer
from tests.test_pipeline_e2e import write_gemini_toml


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv, named, suggested", [
    (["run", "--max_cost", "5"], "--max_cost", "--max-cost"),
    (["generate", "--sampel", "3"], "--sampel", "--sample"),
    (["run", "--runner", "DataflowRunner", "--projekt", "p"], "--projekt", "--project"),
    (["train", "--resum"], "--resum", "--resume"),
    (["evaluate", "--retreival", "x"], "--retreival", "--retrieval"),
    (["run", "--frobnicate"], "--frobnicate", None),
])
def test_an_unknown_option_stops_the_command_and_names_the_closest_known_one(capsys, argv, named, suggested):
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"embforge: error: embforge {argv[0]}: unknown option {named}")
    if suggested:
        assert line.endswith(f"(did you mean {suggested}?)")
    else:
        assert "did you mean" not in line


def test_beam_options_pass_through_and_verbose_works_after_the_command():
    beam = ["--runner", "DataflowRunner", "--project", "p", "--region=europe-west4", "--temp_location", "gs://b/t"]
    args, options = parse_arguments(["generate", *beam, "-v"])
    assert options == beam and args.verbose is True
    config = load_run_config(None, [], options)
    assert config.generate.beam.runner == "DirectRunner" and config.generate.beam.options == tuple(beam)
    args, options = parse_arguments(["-v", "run"])
    assert options == [] and args.verbose is True
    args, _ = parse_arguments(["run"])
    assert args.verbose is False


def test_a_stray_argument_is_an_error(capsys):
    assert main(["run", "extra"]) == 2
    assert _one_error_line(capsys) == "embforge: error: embforge run: unexpected argument 'extra'"


def _task_spec(tmp_path) -> str:
    path = tmp_path / "task.yaml"
    path.write_text("name: intents\ndescription: Route messages\nlabels:\n  - name: only\n    description: one label\n")
    return str(path)


def _bad_beir(tmp_path) -> str:
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a passage"}\n{"_id": "d2"\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "a query"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return str(folder)


@pytest.mark.parametrize("case", ["config", "corpus", "evaluation-data", "model", "unknown-packaged-model",
                                  "task-spec", "evaluate-without-tasks", "evaluate-without-models"])
def test_every_user_error_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, case):
    # Defaults relative to the working folder (the cache, .embforge-cache) land in the test's folder, not the
    # checkout's, whose cache a developer's own runs use.
    monkeypatch.chdir(tmp_path)
    output = ["--output", str(tmp_path / "run")]
    argv, expected = {
        "config": (["generate", *output, "--set", "generate.queries.queries_per_passage=0"],
                   "generate.queries: queries_per_passage must be >= 1, got 0"),
        "corpus": (["generate", *output, "--corpus", str(tmp_path / "absent.jsonl")], "absent.jsonl"),
        "evaluation-data": (["evaluate", "--model", "base=packaged:all-minilm-l6-v2", "--retrieval",
                             _bad_beir(tmp_path), "--output", str(tmp_path / "report")],
                            "corpus.jsonl line 2: not valid JSON"),
        "model": (["evaluate", "--model", f"mine={tmp_path / 'no-such-model'}", "--retrieval", _bad_beir(tmp_path)],
                  "no-such-model"),
        "unknown-packaged-model": (["evaluate", "--model", "mine=packaged:no-such-model", "--retrieval",
                                    _bad_beir(tmp_path)], "unknown packaged model 'packaged:no-such-model'"),
        "task-spec": (["generate", *output, "--set", f"generate.counterfactuals.task_spec={_task_spec(tmp_path)}"],
                      "'labels' needs at least 2 labels"),
        "evaluate-without-tasks": (["evaluate", "--model", "base=packaged:all-minilm-l6-v2"],
                                   "evaluate: nothing to evaluate on"),
        "evaluate-without-models": (["evaluate", "--retrieval", _bad_beir(tmp_path)],
                                    "evaluate: no model to evaluate"),
    }[case]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith("embforge: error:") and expected in line, line
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.slow
def test_a_rejected_api_key_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "not-the-key")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "p1", "text": "a passage about heaps"}) + "\n")
    with FakeGeminiServer(api_key="the-right-key") as server:
        config = write_gemini_toml(tmp_path / "run.toml", server, output=tmp_path / "run",
                                   cache_dir=tmp_path / "cache", corpus=corpus)
        assert main(["generate", "--config", config]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("embforge: error:") and "rejected the request's credentials" in line, line
    assert "not-the-key" not in line and "the-right-key" not in line


def test_an_error_from_a_beam_worker_process_is_read_from_its_traceback():
    # Beam's multi_processing runner hands back a worker's failure as a RuntimeError holding the traceback text.
    text = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in setup\n"
            "pipelines.clients.gemini.GeminiAuthError: gemini-2.5-flash: the Gemini API rejected the request's "
            "credentials (400 INVALID_ARGUMENT)\n")
    assert describe_error(RuntimeError(text)) == (
        "gemini-2.5-flash: the Gemini API rejected the request's credentials (400 INVALID_ARGUMENT)", True)
    assert describe_error(RuntimeError("Traceback (most recent call last):\nKeyError: 'x'\n")) == ("KeyError: 'x'",
                                                                                                   False)


def test_a_failure_that_is_not_the_users_is_one_line_exit_1_and_verbose_shows_the_traceback(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise KeyError("passage_id")

    monkeypatch.setattr("pipelines.run.generate", broken)
    assert main(["generate"]) == 1
    assert _one_error_line(capsys) == "embforge: failed: KeyError: 'passage_id' (-v shows the traceback)"
    assert main(["generate", "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("embforge: failed: KeyError: "
                                                                               "'passage_id'")


def test_the_console_shows_embforges_lines_and_the_log_file_everything(tmp_path, capsys, monkeypatch):
    def chatty(config):
        logging.getLogger("apache_beam.runners").info("a Beam detail")
        logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
        logging.getLogger("pipelines.run").info("stage balance: all good")

    monkeypatch.setattr("pipelines.run.generate", chatty)
    assert main(["generate", "--output", str(tmp_path / "run")]) == 0
    console = capsys.readouterr().err
    assert "stage balance: all good" in console
    assert "a Beam detail" not in console and "a transformers warning" not in console
    log = (tmp_path / "run" / "embforge.log").read_text()
    assert "a Beam detail" in log and "a transformers warning" in log and "stage balance: all good" in log
    assert main(["generate", "-v", "--output", str(tmp_path / "run")]) == 0
    assert "a Beam detail" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_takes_its_data_by_flag_in_every_format(tmp_path, capsys):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    passages = ["heaps are trees", "sockets carry bytes", "zip packs files"]
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": text}) + "\n"
                                               for i, text in enumerate(passages)))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what is a heap"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\n")
    rows = [("refund my card", "money"), ("my card was charged twice", "money"), ("the bike is broken", "repair"),
            ("a flat tyre on my bike", "repair")]
    with gzip.open(tmp_path / "train.tsv.gz", "wt", encoding="utf-8") as handle:
        handle.write("message\tintent\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"message": text, "intent": label}) + "\n"
                                                 for text, label in rows))
    report_dir = tmp_path / "report"
    assert main(["evaluate", "--model", "base=packaged:all-minilm-l6-v2", "--retrieval", f"mini={beir}",
                 "--classification", f"intents={tmp_path / 'train.tsv.gz'},{tmp_path / 'test.jsonl'}",
                 "--text-field", "message", "--label-field", "intent", "--output", str(report_dir),
                 "--set", "evaluate.dims=[384]", "--set", "evaluate.int8=false",
                 "--set", "evaluate.max_seq_length=64"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["models"]["base"]["max_seq_length"] == 64
    assert [(task["name"], task["kind"]) for task in report["tasks"]] == [("mini", "retrieval"),
                                                                          ("intents", "classification")]
    assert {row["task"] for row in report["results"]} == {"mini", "intents"}
    assert "report:" in capsys.readouterr().err


def test_quantize_then_evaluate_the_quantized_student_beside_the_float_one(tmp_path, capsys):
    from tests.eval_data_factory import write_beir
    from tests.tiny_student import write_tiny_student

    student = write_tiny_student(str(tmp_path / "student"))
    quantized = str(tmp_path / "int4")
    assert main(["quantize", student, "--precision", "int4", "--output", quantized]) == 0
    assert capsys.readouterr().out.strip() == quantized
    report_dir = tmp_path / "report"
    assert main(["evaluate", "--model", f"float={student}", "--model", f"int4={quantized}", "--retrieval",
                 str(write_beir(tmp_path / "beir")), "--output", str(report_dir), "--binary",
                 "--set", "evaluate.dims=[32]"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert {name: info["weight_precision"] for name, info in report["models"].items()} == {"float": "float32",
                                                                                           "int4": "int4"}
    assert {row["precision"] for row in report["results"]} == {"float32", "int8", "binary", "binary+rescore"}


@pytest.mark.parametrize("precision, model, expected", [
    ("int3", "student", "--precision 'int3': expected one of int8, int4, mixed"),
    ("int8", "not-a-model", "not-a-model/modules.json: not found"),
])
def test_a_bad_quantize_command_is_one_line_and_exit_2(tmp_path, capsys, precision, model, expected):
    from tests.tiny_student import write_tiny_student

    write_tiny_student(str(tmp_path / "student"))
    (tmp_path / "not-a-model").mkdir()
    assert main(["quantize", str(tmp_path / model), "--precision", precision, "--output", str(tmp_path / "q")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("embforge: error:") and expected in line, line
    assert not (tmp_path / "q").exists()
