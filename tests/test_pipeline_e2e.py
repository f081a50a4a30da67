"""The whole generation pipeline, end to end.

- Through the real google-genai SDK against the fake Gemini server, on a corpus constructed so the right outcome is
  known: LLM grading, LLM negative scoring with one relabel and one dropped false negative, counterfactual
  classification data.
- A second run with the same inputs makes zero LLM and zero embedding calls.
- Every stage balances in the manifest (input + expanded = kept + rejected + skipped).
- The same run in multi_threading and multi_processing modes (everything pickles, as Dataflow requires).
- The offline default (local LLM, local teacher, stdlib corpus), then a few training steps on its shards.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import replace

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_schemas import EMBEDDING_CACHE_ENTRY, LLM_CACHE_ENTRY, SCHEMAS, stage_balances
from pipelines import run_layout
from pipelines.cache import EMBEDDING_CACHE, LLM_CACHE, cache_files, read_cache_file
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.config import BeamConfig, GenerateConfig, load_run_config
from pipelines.run import GenerationFailed, generate
from pipelines.stages import grade_relevance
from pipelines.stages.embed_teacher import EmbedTeacherConfig
from pipelines.stages.generate_counterfactuals import GenerateCounterfactualsConfig
from pipelines.stages.grade_relevance import GradeRelevanceConfig
from pipelines.stages.mine_negatives import MineNegativesConfig
from pipelines.stages.read_corpus import ReadCorpusConfig
from tests.fakes.backends import KeywordEmbedder
from tests.fakes.classification_llm import ENDINGS, LABEL_WORDS
from tests.fakes.gemini_server import FakeGeminiServer, FaultPlan

# Every test here runs the whole generation pipeline.
pytestmark = pytest.mark.slow

#: Topic words of the corpus, then the bike-share task's label words (tests/fakes/classification_llm.py): the
#: keyword teacher also judges the counterfactuals' labels.
VOCABULARY = ("json", "csv", "heap", "zip", "regex", "date", "socket", "thread",
              *(word for words in LABEL_WORDS.values() for word in words))
FILLER = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen"
# Passage text decides every scripted answer: the first word is the topic (and the generated query); "[best]" and
# "[relevant]" set the negative-scoring grade for queries on that topic; "[broken]" makes query generation answer
# truncated JSON and "[noquery]" an answer violating the output schema.
CORPUS = [
    ("json-main", "json json json json"),
    ("json-best", f"json [best] [noquery] {FILLER}"),  # clearly better than json-main for the query "json": relabel
    ("json-also", f"json [relevant] [noquery] {FILLER}"),  # a false negative for "json": dropped by LLM scoring
    ("csv-main", "csv csv csv csv"),
    ("heap-main", "heap heap heap heap"),
    ("zip-main", "zip zip zip zip"),
    ("regex-main", "regex regex regex regex"),
    ("date-main", "date date date date"),
    ("socket-broken", "socket [broken] socket socket"),
    ("thread-offtopic", "thread [offtopic] thread thread"),  # its query misses it: rejected by LLM grading
]
KEY = "sentinel-key-for-e2e"


def _tag(text: str, tag: str) -> str:
    match = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.S)
    return match.group(1) if match else ""


def scripted_gemini(body) -> str:
    """Answers like a capable LLM would for this corpus, chosen by the prompt's system instruction."""
    system = body["systemInstruction"]["parts"][0]["text"]
    user = body["contents"][-1]["parts"][0]["text"]
    passage, query = _tag(user, "passage"), _tag(user, "query")
    if system.startswith("You write search queries"):
        if "[broken]" in passage:
            return '{"task": "Given a'
        if "[noquery]" in passage:
            return json.dumps({"task": "Given a keyword, retrieve passages about it"})
        if "[offtopic]" in passage:
            return json.dumps({"task": "Given a keyword, retrieve passages about it", "query": "regex"})
        return json.dumps({"task": "Given a keyword, retrieve passages about it", "query": passage.split()[0]})
    if system.startswith("You grade search results"):
        return json.dumps({"reason": "on topic", "relevance": 3 if query in passage else 0})
    if system.startswith("You judge candidate search results"):
        on_topic = query in passage.split()
        grade = (3 if "[best]" in passage else 2 if "[relevant]" in passage else 1) if on_topic else 0
        return json.dumps({"relevance": grade})
    if system.startswith("You write new labelled examples"):
        label = (re.search(r"Label: (\S+)", user) or re.search(r"label[^\n]*?(\w+)", user)).group(1)
        # Written in the label's own words, so the label judge (the keyword teacher) reads them as that label.
        words = LABEL_WORDS.get(label, ("lost", "item"))
        return json.dumps({"examples": [f"message {index}: {words[index]} {words[index + 2]}" for index in range(2)]})
    if system.startswith("You write counterfactual"):
        # A minimal edit toward the target label, as a capable LLM writes it: the judge keeps it.
        target = re.search(r'belongs to the target label "(.+?)"', user).group(1)
        return json.dumps({"text": " ".join(_tag(user, "text").split()[:-2] + [ENDINGS[target]])})
    raise AssertionError(f"unexpected prompt: {system[:80]}")


def keyword_vector(text: str, task_type, dimension: int) -> list[float]:
    return KeywordEmbedder(VOCABULARY, dimension).embed([text], task_type, dimension)[0].tolist()


@pytest.fixture
def gemini(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    with FakeGeminiServer(generate=scripted_gemini, embed=keyword_vector) as server:
        yield server


def gemini_config(tmp_path, server, corpus_rows=CORPUS, **beam) -> GenerateConfig:
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text("".join(json.dumps({"id": pid, "text": text}) + "\n" for pid, text in corpus_rows))
    fast_retries = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 2.0}
    return GenerateConfig(
        output=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        corpus=ReadCorpusConfig(path=str(corpus)),
        llm=LLMSpec(backend="gemini", base_url=server.base_url, **fast_retries),
        teacher=EmbedderSpec(backend="gemini", base_url=server.base_url, **fast_retries),
        embed=EmbedTeacherConfig(dimension=64),
        grading=GradeRelevanceConfig(use_llm=True, use_roundtrip=True, roundtrip_top_k=8),
        mining=MineNegativesConfig(k=8, num_negatives=3, llm_scoring=True, llm_candidates=5),
        counterfactuals=GenerateCounterfactualsConfig(
            task_spec=os.path.join(os.path.dirname(__file__), "data", "counterfactuals", "task.yaml"),
            examples_per_label=2, examples_per_request=2, max_seeds_per_label=2),
        beam=BeamConfig(**beam),
    )


def write_gemini_toml(path, server, *, cache_dir, corpus, output=None, llm_concurrency: int = 8, k: int = 8,
                      num_negatives: int = 3, more: str = "") -> str:
    """A config file for `embforge generate` / `embforge run` on the fake Gemini server (for CLI and subprocess runs).

    Without `output` the run goes where `--output` says; `more` is appended as is (the [train] and [evaluate] tables).
    """
    output_line = f'output = "{output}"\n' if output is not None else ""
    path.write_text(f"""
[generate]
{output_line}cache_dir = "{cache_dir}"
[generate.corpus]
path = "{corpus}"
[generate.llm]
backend = "gemini"
base_url = "{server.base_url}"
concurrency = {llm_concurrency}
[generate.teacher]
backend = "gemini"
base_url = "{server.base_url}"
[generate.embed]
dimension = 64
[generate.mining]
k = {k}
num_negatives = {num_negatives}
{more}""")
    return str(path)


def read_kind(run_dir: str, kind: str) -> list[dict]:
    """Every row of one record kind, validated against its schema."""
    return run_layout.read_kind(run_dir, kind, SCHEMAS[kind]).to_pylist()


def check_run(run_dir: str, manifest: dict) -> None:
    """Shards match data_schemas, every stage balances, and the manifest's output counts are the shards' rows."""
    for stage in manifest["stages"]:
        assert stage_balances(stage), stage
        assert sum(stage["reasons"].values()) == stage["rejected"]
    for kind, count in manifest["outputs"].items():
        assert len(read_kind(run_dir, kind)) == count, kind
    on_disk = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert on_disk["balanced"] is True


def test_gemini_pipeline_relabels_drops_false_negatives_and_reruns_from_cache(tmp_path, gemini):
    config = gemini_config(tmp_path, gemini)
    manifest = generate(config)
    check_run(config.output, manifest)

    triplets = {row["query"] + "/" + row["positive_id"]: row for row in read_kind(config.output, "triplets")}
    relabeled = [row for row in triplets.values() if row["positive_relabeled"]]
    assert [row["positive_id"] for row in relabeled] == ["json-best"]
    assert all("json-also" not in row["negative_ids"] for row in relabeled), "a false negative stayed a negative"
    assert manifest["mining"]["relabeled"] == 1
    assert manifest["mining"]["dropped.llm_relevant"] >= 1
    assert all(row["negative_llm_scores"] is not None for row in triplets.values())

    rejected = {row["record_id"]: row for row in read_kind(config.output, "rejected") if row["record_id"]}
    assert rejected["thread-offtopic::q0"]["reason"] == "llm_irrelevant"
    assert '"llm_relevance": 0.0' in rejected["thread-offtopic::q0"]["payload"]
    for failed, raw in (("socket-broken::q0", '{"task": "Given a'), ("json-best::q0", '"task"')):
        assert rejected[failed]["reason"] == "llm_failed"
        assert raw in rejected[failed]["raw_answer"]

    classification = read_kind(config.output, "classification")
    assert {row["origin"] for row in classification} == {"seed", "generated", "counterfactual"}
    assert all(row["label"] != row["original_label"] for row in classification if row["origin"] == "counterfactual")

    usage = {row["stage"]: row for row in manifest["llm_usage"]}
    assert usage["generate_queries"]["calls"] > 0 and usage["generate_queries"]["input_tokens"] > 0
    assert manifest["cache"]["embeddings_computed"] > 0

    # The same inputs again: successes come from the cache; only the 3 failed requests are asked again (failures are
    # never cached), each up to max_parse_attempts times; no text is embedded again.
    gemini.reset()
    second = generate(config)
    resent = {" ".join(_tag(request.body["contents"][-1]["parts"][0]["text"], "passage").split()[:2])
              for request in gemini.requests}
    assert resent == {"socket [broken]", "json [best]", "json [relevant]"}
    assert len(gemini.requests) == 3 * config.llm.max_parse_attempts
    assert second["cache"]["llm_calls"] == 3
    assert second["cache"]["embeddings_computed"] == 0
    assert second["outputs"] == manifest["outputs"]
    check_run(config.output, second)

    # Nothing the run wrote holds the API key.
    for path in glob.glob(os.path.join(tmp_path, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                assert KEY.encode() not in handle.read(), path


def test_second_run_with_the_same_inputs_makes_zero_llm_and_embedding_calls(tmp_path, gemini):
    clean_corpus = [(pid, text) for pid, text in CORPUS if "[" not in text]
    config = gemini_config(tmp_path, gemini, corpus_rows=clean_corpus)
    first = generate(config)
    assert first["cache"]["llm_calls"] > 0 and first["cache"]["embeddings_computed"] > 0
    gemini.reset()
    second = generate(config)
    assert gemini.requests == []
    assert second["cache"].get("llm_calls", 0) == 0
    assert second["cache"]["embeddings_computed"] == 0
    assert all(row["calls"] == 0 and row["cache_hits"] > 0 for row in second["llm_usage"])
    assert second["outputs"] == first["outputs"]


def test_a_cache_of_the_layout_before_partitions_is_moved_once_and_answers_the_rerun(tmp_path, gemini):
    clean_corpus = [(pid, text) for pid, text in CORPUS if "[" not in text]
    config = gemini_config(tmp_path, gemini, corpus_rows=clean_corpus)
    generate(config)
    # The same entries as a cache written before partitions: every file directly in llm/ and embeddings/.
    entries = {}
    for kind in (LLM_CACHE, EMBEDDING_CACHE):
        rows = [row for path in cache_files(config.cache_dir, kind) for row in read_cache_file(path, kind).to_pylist()]
        entries[kind] = sorted(row["key"] for row in rows)
        shutil.rmtree(os.path.join(config.cache_dir, kind))
        os.makedirs(os.path.join(config.cache_dir, kind))
        schema = {LLM_CACHE: LLM_CACHE_ENTRY, EMBEDDING_CACHE: EMBEDDING_CACHE_ENTRY}[kind]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                       os.path.join(config.cache_dir, kind, "before-partitions.parquet"))
    gemini.reset()
    second = generate(config)
    assert gemini.requests == []
    assert second["cache"].get("llm_calls", 0) == 0 and second["cache"]["embeddings_computed"] == 0
    for kind in (LLM_CACHE, EMBEDDING_CACHE):
        assert not os.path.exists(os.path.join(config.cache_dir, kind, "before-partitions.parquet"))
        moved = [row["key"] for path in cache_files(config.cache_dir, kind)
                 for row in read_cache_file(path, kind).to_pylist()]
        assert sorted(moved) == entries[kind]


def test_pipeline_completes_under_service_faults(tmp_path, gemini):
    # About 30% of calls fail with 429 (Retry-After) or 5xx, some time out, some answers are truncated, violate the
    # schema, have no candidates or are safety-blocked. Transient failures are retried within the bound; what stays
    # broken lands in rejected/ with the raw answer; every stage still balances.
    gemini.faults = FaultPlan(seed=7, errors={429: 0.15, 500: 0.05, 503: 0.1}, retry_after_s=0.05, timeout=0.02,
                              hang_s=3.0, truncated_body=0.03, truncated_answer=0.03, schema_violation=0.03,
                              empty_candidates=0.02, safety=0.02)
    config = gemini_config(tmp_path, gemini)
    manifest = generate(config)
    check_run(config.output, manifest)
    statuses = gemini.status_counts()
    assert statuses[429] and statuses[503] and statuses[200], statuses
    faults = {request.fault for request in gemini.requests if request.fault}
    assert {"timeout", "schema_violation"} <= faults, faults
    assert manifest["outputs"]["triplets"] > 0
    rejected = {row["record_id"]: row for row in read_kind(config.output, "rejected") if row["record_id"]}
    # Its last attempt may have met a transport fault too: the raw answer is whatever came back last.
    assert rejected["socket-broken::q0"]["reason"] == "llm_failed"
    assert "Given a" in rejected["socket-broken::q0"]["raw_answer"]
    per_call = {}
    for request in gemini.requests:
        digest = json.dumps(request.body, sort_keys=True)
        per_call[digest] = per_call.get(digest, 0) + 1
    # Transport retries x answer re-asks bound the requests any one call can make.
    assert max(per_call.values()) <= config.llm.max_attempts * config.llm.max_parse_attempts


def test_a_stage_that_loses_a_row_fails_the_run_loudly_and_keeps_the_earlier_run(tmp_path, gemini, monkeypatch):
    # A bug that drops a row without a rejection: the stage's counts no longer balance, so the run must fail, name the
    # stage, leave its manifest (balanced = false) in the staging folder, and keep the earlier good run in place.
    config = gemini_config(tmp_path, gemini, corpus_rows=[row for row in CORPUS if "[" not in row[1]])
    earlier = generate(config)
    earlier_shards = {kind: read_kind(config.output, kind) for kind in earlier["outputs"]}
    original = grade_relevance._GradeFn.process

    def losing_one_pair(self, element):
        for output in original(self, element):
            row = output.value if isinstance(output, beam.pvalue.TaggedOutput) else output
            if row.get("pair_id") != "csv-main::q0":
                yield output

    monkeypatch.setattr(grade_relevance._GradeFn, "process", losing_one_pair)
    with pytest.raises(GenerationFailed, match="does not balance in stage.s. grade_relevance.*left as it was"):
        generate(config)
    staged = json.load(open(os.path.join(config.output, ".staging", "manifest.json")))
    assert staged["balanced"] is False
    grading = next(stage for stage in staged["stages"] if stage["stage"] == "grade_relevance")
    assert grading["input"] == grading["kept"] + grading["rejected"] + 1
    on_disk = json.load(open(os.path.join(config.output, "manifest.json")))
    assert on_disk["run_id"] == earlier["run_id"] and on_disk["balanced"] is True
    assert {kind: read_kind(config.output, kind) for kind in earlier["outputs"]} == earlier_shards


@pytest.mark.parametrize("mode", ["multi_threading", "multi_processing"])
def test_pipeline_runs_in_every_local_running_mode(tmp_path, gemini, mode):
    # multi_processing pickles every DoFn and its spec into worker processes, as Dataflow does.
    config = gemini_config(tmp_path, gemini, direct_running_mode=mode, direct_num_workers=2)
    manifest = generate(config)
    check_run(config.output, manifest)
    assert manifest["outputs"]["triplets"] > 0


def test_offline_default_generates_valid_shards_and_trains(tmp_path):
    from embedder.train import train

    config = load_run_config(None, [
        f"generate.output={tmp_path / 'run'}", f"generate.cache_dir={tmp_path / 'cache'}", "generate.corpus.sample=6",
        f"train.output_dir={tmp_path / 'student'}", "train.max_steps=2", "train.batch_size=4",
        "train.max_seq_length=32", "train.progress=false",
    ])
    manifest = generate(config.generate)
    check_run(config.generate.output, manifest)
    assert manifest["outputs"]["triplets"] > 0
    assert manifest["models"]["llm"].startswith("packaged:smollm2")
    model_dir = train(config.train_config(), config.generate.output)
    assert os.path.exists(os.path.join(model_dir, "modules.json"))
    # A second run of the offline default calls no model at all.
    again = generate(replace(config.generate))
    assert again["cache"].get("llm_calls", 0) == 0 and again["cache"]["embeddings_computed"] == 0
