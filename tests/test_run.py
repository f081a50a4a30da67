"""pipelines/run.py's evaluation side: `evaluation_tasks` (the tasks a config names, checked before any work),
`evaluate` (every model on every task, the report swapped in only once complete) and `run_all` (generate -> hold out
-> train -> evaluate, refusing early what a later step would fail on).

`evaluate` builds its models through `build_embedder`; here that returns keyword embedders whose right answers are
known (tests/fakes/backends.py). The one whole `run_all` uses the fake Gemini server and trains the packaged MiniLM
for two steps, as tests/test_cli_run.py does through the CLI.
"""

from __future__ import annotations

import json
import os

import pytest

from embedder.evaluate import ClassificationTask, RetrievalTask
from pipelines.clients import factory
from pipelines.config import EvaluateConfig, load_run_config
from pipelines.config_loading import ConfigError
from pipelines.run import evaluate, evaluation_tasks, run_all
from tests.eval_data_factory import KEYWORDS, ConfusedEmbedder, write_beir, write_labeled_csv
from tests.fakes.backends import KeywordEmbedder
from tests.fakes.gemini_server import FakeGeminiServer
from tests.test_cli_run import CLEAN_CORPUS
from tests.test_pipeline_e2e import KEY, scripted_gemini

# --- evaluation_tasks -------------------------------------------------------------------------------------------------


def test_tasks_are_named_by_the_config_or_after_their_folder_and_file(tmp_path):
    beir = str(write_beir(tmp_path / "toy-beir"))
    train = str(write_labeled_csv(tmp_path / "train.csv", [("ball", "sport"), ("oven", "cooking")]))
    test = str(write_labeled_csv(tmp_path / "test.csv", [("goal", "sport")]))
    config = EvaluateConfig(retrieval=(f"named={beir}", beir + "/"), retrieval_split="train",
                            classification=(f"intents={train},{test}", f"{train},{test}"), label_field="category")
    assert evaluation_tasks(config) == [
        RetrievalTask("named", beir, "train"),
        RetrievalTask("toy-beir", beir + "/", "train"),
        ClassificationTask("intents", train, test, label_field="category"),
        ClassificationTask("train.csv", train, test, label_field="category"),
    ]


def test_a_path_with_an_equals_sign_is_a_path_not_a_name(tmp_path):
    beir = str(write_beir(tmp_path / "lr=0.1"))
    assert evaluation_tasks(EvaluateConfig(retrieval=(beir,))) == [RetrievalTask("lr=0.1", beir)]


def test_no_retrieval_or_classification_entries_give_no_tasks():
    assert evaluation_tasks(EvaluateConfig()) == []


@pytest.mark.parametrize(("entry", "message"), [
    ("retrieval", r"evaluate.retrieval '.*': .*qrels/dev.tsv not found \(a BEIR folder holds corpus.jsonl, "
                  r"queries.jsonl and qrels/dev.tsv\)"),
    ("no-comma", r"evaluate.classification '.*': expected \[NAME=\]TRAIN,TEST"),
    ("missing-file", r"evaluate.classification '.*': .*absent.csv not found"),
    ("same-name", r"evaluate: two tasks are named 'toy'; name them apart with NAME=..."),
])
def test_a_task_that_cannot_run_is_a_config_error_naming_it(tmp_path, entry, message):
    beir = str(write_beir(tmp_path / "toy"))
    train = str(write_labeled_csv(tmp_path / "train.csv", [("ball", "sport")]))
    config = {
        "retrieval": EvaluateConfig(retrieval=(beir,), retrieval_split="dev"),
        "no-comma": EvaluateConfig(classification=(train,)),
        "missing-file": EvaluateConfig(classification=(f"{train},{tmp_path / 'absent.csv'}",)),
        "same-name": EvaluateConfig(retrieval=(beir, f"toy={beir}")),
    }[entry]
    with pytest.raises(ConfigError, match=message):
        evaluation_tasks(config)


# --- evaluate ---------------------------------------------------------------------------------------------------------


class _BrokenEmbedder(KeywordEmbedder):
    def embed(self, texts, task_type, dimension=None):
        raise RuntimeError("the model fell over")


@pytest.fixture
def keyword_models(monkeypatch) -> list:
    """`build_embedder` as `evaluate` reaches it, returning a keyword embedder chosen by the model name; yields the
    specs it was asked for."""
    kinds = {"keyword": KeywordEmbedder, "confused": ConfusedEmbedder, "broken": _BrokenEmbedder}
    specs = []

    def build(spec):
        specs.append(spec)
        return kinds[spec.model](KEYWORDS, 32)

    monkeypatch.setattr(factory, "build_embedder", build)
    return specs


def test_evaluate_reports_every_model_and_replaces_the_earlier_report(tmp_path, keyword_models):
    output = tmp_path / "report"
    output.mkdir()
    (output / "stale.txt").write_text("from an earlier report")
    config = EvaluateConfig(models={"base": "keyword", "other": "confused"}, retrieval=(str(write_beir(tmp_path)),),
                            dims=(32, 16), int8=False, output=str(output))
    report = evaluate(config)
    assert report["baseline"] == "base" and list(report["models"]) == ["base", "other"]
    assert [task["name"] for task in report["tasks"]] == [tmp_path.name]
    scores = {(row["model"], row["dimension"]): row["metrics"]["mrr@10"] for row in report["results"]}
    assert scores == {("base", 32): 1.0, ("base", 16): 1.0, ("other", 32): 0.875, ("other", 16): 0.875}
    # Every model is read at the one window the config states.
    assert {spec.max_seq_length for spec in keyword_models} == {config.max_seq_length}
    assert sorted(os.listdir(output)) == ["report.json", "report.md", "report.png"]
    assert json.loads((output / "report.json").read_text()) == report
    assert not [name for name in os.listdir(tmp_path) if "staging" in name]


def test_a_failed_evaluation_leaves_the_earlier_report_as_it_was(tmp_path, keyword_models):
    output = tmp_path / "report"
    output.mkdir()
    (output / "report.md").write_text("the earlier report")
    config = EvaluateConfig(models={"base": "broken"}, retrieval=(str(write_beir(tmp_path / "beir")),), dims=(32,),
                            output=str(output))
    with pytest.raises(RuntimeError, match="the model fell over"):
        evaluate(config)
    assert os.listdir(output) == ["report.md"] and (output / "report.md").read_text() == "the earlier report"


@pytest.mark.parametrize(("models", "retrieval", "message"), [
    ({"base": "keyword"}, False, "evaluate: nothing to evaluate on"),
    ({}, True, "evaluate: no model to evaluate"),
])
def test_evaluate_without_tasks_or_models_is_a_config_error(tmp_path, keyword_models, models, retrieval, message):
    config = EvaluateConfig(models=models, retrieval=(str(write_beir(tmp_path)),) if retrieval else (),
                            output=str(tmp_path / "report"))
    with pytest.raises(ConfigError, match=message):
        evaluate(config)
    assert keyword_models == [] and not (tmp_path / "report").exists()


# --- run_all ----------------------------------------------------------------------------------------------------------


def _run_config(folder, server=None, overrides=()):
    """A run over CLEAN_CORPUS: the fake Gemini server as LLM and teacher when given (the offline defaults otherwise),
    two training steps."""
    corpus = folder / "passages.jsonl"
    corpus.write_text("".join(json.dumps({"id": pid, "text": text}) + "\n" for pid, text in CLEAN_CORPUS))
    settings = [f"generate.corpus.path={corpus}", f"generate.output={folder / 'run'}",
                f"generate.cache_dir={folder / 'cache'}", "generate.embed.dimension=64", "generate.mining.k=4",
                "generate.mining.num_negatives=2", "train.max_steps=2", "train.batch_size=4",
                "train.max_seq_length=32", "train.progress=false", "train.checkpoint_every=0",
                "evaluate.dims=[384, 64]", "evaluate.int8=false", *overrides]
    if server is not None:
        settings += [f"generate.{role}.{key}={value}" for role in ("llm", "teacher")
                     for key, value in (("backend", "gemini"), ("base_url", server.base_url))]
    return load_run_config(None, settings)


@pytest.mark.parametrize(("overrides", "message"), [
    (["evaluate.holdout_fraction=0"], "evaluate: nothing to evaluate on: set evaluate.holdout_fraction > 0"),
    (["train.student={missing}/student-model"], "student-model"),
    (["evaluate.retrieval=['{missing}/beir']"], "beir/corpus.jsonl not found"),
], ids=["nothing-to-evaluate", "missing-student", "missing-beir-folder"])
def test_run_all_refuses_before_generating_what_a_later_step_would_fail_on(tmp_path, overrides, message):
    config = _run_config(tmp_path, overrides=[entry.format(missing=tmp_path / "missing") for entry in overrides])
    with pytest.raises(Exception, match=message):
        run_all(config)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_run_all_generates_holds_out_trains_and_evaluates_base_against_trained(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    with FakeGeminiServer(generate=scripted_gemini) as server:
        # The sample leaves passages out: the held-out queries are still searched against the whole corpus.
        config = _run_config(tmp_path, server, ["generate.corpus.sample=4", "evaluate.holdout_fraction=0.5"])
        report = run_all(config)
    run = tmp_path / "run"
    student = config.train_config().output_dir
    assert report["models"]["base"]["model_id"] != report["models"]["trained"]["model_id"]
    assert os.path.exists(os.path.join(student, "model", "model.safetensors"))
    [task] = report["tasks"]
    assert task["data_dir"] == str(run / "holdout_eval") and task["passages"] == len(CLEAN_CORPUS)
    held_out = (run / "holdout_eval" / "queries.jsonl").read_text().splitlines()
    assert task["queries"] == len(held_out) > 0
    # Training saw only the queries not held out.
    with open(run / "manifest.json", encoding="utf-8") as handle:
        triplets = json.load(handle)["outputs"]["triplets"]
    with open(os.path.join(student, "train_summary.json"), encoding="utf-8") as handle:
        assert json.load(handle)["data"]["triplet_rows"] == triplets - len(held_out)
    assert {row["model"] for row in report["results"]} == {"base", "trained"}
    assert os.path.exists(os.path.join(config.evaluate.output, "report.md"))


def test_the_generate_searches_spill_into_the_runs_staging_folder(tmp_path):
    """A killed run's spill files go where the next run clears them (its staging folder), not the machine's /tmp."""
    import apache_beam as beam
    from apache_beam.pipeline import PipelineVisitor

    from pipelines.config import GenerateConfig, ReadCorpusConfig
    from pipelines.run import SEARCH_SPILL_FOLDER, build_generate_pipeline
    from pipelines.sharded_search import SearchShards

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "Heaps keep the smallest item first."}\n')
    staging = str(tmp_path / "run" / ".staging")
    pipeline = beam.Pipeline()
    build_generate_pipeline(pipeline, GenerateConfig(output=str(tmp_path / "run"),
                                                     corpus=ReadCorpusConfig(path=str(corpus))), staging)
    searches = []

    class FindSearches(PipelineVisitor):
        def enter_composite_transform(self, node) -> None:
            if isinstance(node.transform, SearchShards):
                searches.append(node.transform)

    pipeline.visit(FindSearches())
    roots = {transform._spill_root for transform in searches}
    assert len(searches) == 2 and roots == {f"{staging}/{SEARCH_SPILL_FOLDER}"}
