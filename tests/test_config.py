"""Configuration: files, overrides, and one clear message for every problem before any work starts."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pipelines.cli import build_parser, main
from pipelines.config import load_run_config
from pipelines.config_loading import ConfigError, apply_overrides


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_help_lists_every_command():
    help_text = build_parser().format_help()
    for command in ("generate", "train", "evaluate", "soup", "publish", "run"):
        assert command in help_text


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True,
                            check=True)
    assert "generate" in result.stdout and "publish" in result.stdout


def test_defaults_load_offline(monkeypatch):
    config = load_run_config(None, [])
    assert config.generate.llm.backend == "local"
    assert config.generate.teacher.backend == "local"
    assert config.generate.corpus.path == "builtin:python-stdlib"


def test_toml_and_yaml_files_layer_over_defaults_and_overrides_win(tmp_path):
    toml_path = _write(tmp_path, "run.toml", '[generate]\noutput = "out-toml"\n[generate.mining]\nk = 12\n')
    yaml_path = _write(tmp_path, "run.yaml", "generate:\n  output: out-yaml\n  mining:\n    k: 12\n")
    for path in (toml_path, yaml_path):
        config = load_run_config(path, ["generate.mining.k=20"])
        assert config.generate.output.startswith("out-")
        assert config.generate.mining.k == 20
        assert config.generate.corpus.path == "builtin:python-stdlib"  # untouched default


@pytest.mark.parametrize(("overrides", "message"), [
    (["generate.mining.kk=3"], "generate.mining.kk: unknown key"),
    (["generate.mining.k=0"], "generate.mining: MineNegativesConfig: k must be >= 1, got 0"),
    (["generate.mining.k=many"], "generate.mining.k: expected an integer"),
    (["generate.llm.backend=vllm"], "generate.llm.backend: must be one of"),
    (["evaluate.dims=[64, 128]"], "dims must be strictly descending"),
    (["generate.beam.direct_running_mode=threads"], "direct_running_mode: must be one of"),
    # More negatives than the k - 1 candidates besides the positive.
    (["generate.mining.num_negatives=40"], "num_negatives must be in 1..k-1 = 1..31"),
    (["train.matryoshka_dims=[64, 128]"], "matryoshka_dims: (64, 128) (must be strictly descending"),
    (["generate.corpus.sample=0"], "sample"),
    (["nonsense=1"], "nonsense: unknown key"),
])
def test_bad_values_fail_with_one_message_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(None, overrides)


def test_file_errors_name_the_file(tmp_path):
    bad = _write(tmp_path, "bad.toml", "[generate\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_run_config(bad, [])
    unknown = _write(tmp_path, "unknown.yaml", "generate:\n  outptu: x\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: generate.outptu: unknown key"):
        load_run_config(unknown, [])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_run_config(str(tmp_path / "missing.toml"), [])


def test_gemini_without_a_key_fails_before_work(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="GOOGLE_API_KEY or GEMINI_API_KEY"):
        load_run_config(None, ["generate.llm.backend=gemini"])


def test_cli_reports_config_errors_as_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    assert main(["generate", "--llm", "gemini"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("embforge: error:") and "GEMINI_API_KEY" in error and "\n" not in error


def test_overrides_parse_values_as_yaml():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "a.d=true", "e.f=text"])
    assert data == {"a": {"b": 2, "c": [1, 2], "d": True}, "e": {"f": "text"}}
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["novalue"])


def test_a_learning_rate_in_exponent_notation_is_a_number():
    # PyYAML alone reads 5e-5 as the string "5e-5", which the trainer's checks then fail on.
    data = apply_overrides({}, ["train.learning_rate=5e-5", "a.b=1E3", "a.c=v1e5"])
    assert data == {"train": {"learning_rate": 5e-5}, "a": {"b": 1000.0, "c": "v1e5"}}
    assert load_run_config(None, ["train.learning_rate=5e-5"]).train["learning_rate"] == 5e-5


@pytest.mark.parametrize(("override", "message"), [
    ("train.learning_rate=abc", "train: learning_rate: expected a number, got 'abc'"),
    ("train.epochs=1.5", "train: epochs: expected an integer, got 1.5"),
    ("train.epochs=true", "train: epochs: expected an integer, got True"),
])
def test_a_training_setting_of_the_wrong_type_is_one_message_naming_it(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(None, [override])


def test_unreachable_output_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["generate", "--output", str(blocker / "run")]) == 2
    error = capsys.readouterr().err
    assert "generate.output: cannot write to" in error and str(blocker) in error


def test_soup_of_missing_models_is_one_line(tmp_path, capsys):
    assert main(["soup", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "c")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("embforge: error:") and "\n" not in error
