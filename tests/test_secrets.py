"""Secrets: a full `generate` (Gemini backend) then `publish`, both through the CLI, with sentinel keys in the
environment. The Gemini key and the Hub token appear in no output shard, cache file, manifest, card, uploaded file,
log line or printed text, nor in the Beam pipeline options."""

from __future__ import annotations

import logging
import pickle

import pytest

from pipelines.cli import main
from pipelines.config import load_run_config
from pipelines.run import pipeline_options
from tests.test_pipeline_e2e import KEY, gemini, gemini_config, write_gemini_toml  # noqa: F401 - gemini is a fixture
from tests.test_publish import SENTINEL_TOKEN, hub  # noqa: F401 - hub is a fixture


@pytest.mark.slow
def test_generate_and_publish_never_reveal_the_keys(tmp_path, gemini, hub, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    config = gemini_config(tmp_path, gemini)
    toml = write_gemini_toml(tmp_path / "run.toml", gemini, output=config.output, cache_dir=config.cache_dir,
                             corpus=config.corpus.path)
    assert main(["-v", "generate", "--config", toml]) == 0
    assert main(["publish", "dataset", config.output, "--repo-id", "org/secret-check"]) == 0

    # The key travelled only as an HTTP header; the token likewise.
    assert all(record.status for record in gemini.requests)
    assert set(hub.authorizations) == {f"Bearer {SENTINEL_TOKEN}"}
    options = pipeline_options(load_run_config(toml, []).generate).get_all_options()
    captured = capfd.readouterr()
    for secret in (KEY, SENTINEL_TOKEN):
        for text in (captured.out, captured.err, caplog.text, repr(options)):
            assert secret not in text
        for repo in hub.repos.values():
            for commit in repo.commits.values():
                assert all(secret.encode() not in stored.content for stored in commit.files.values())
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("variable", ["GEMINI_API_KEY", "GOOGLE_API_KEY"])
def test_key_in_either_variable_is_accepted_and_never_in_the_config(monkeypatch, variable):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv(variable, KEY)
    config = load_run_config(None, ["generate.llm.backend=gemini"])
    assert KEY not in repr(config)


def test_the_key_holder_refuses_to_pickle_and_hides_in_text():
    # Beam pickles DoFns for workers; a client built by mistake outside setup() must fail there, not ship the key.
    from pipelines.clients.secret import Secret

    secret = Secret(KEY, "the Gemini API key")
    with pytest.raises(TypeError, match="the Gemini API key does not pickle"):
        pickle.dumps(secret)
    assert KEY not in repr(secret) and KEY not in str(secret) and KEY not in f"{secret}"
    assert secret.redact(f"server said: bad key {KEY}") == "server said: bad key [redacted]"
