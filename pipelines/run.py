"""Compose the stages into the generation pipeline, run it, and chain generate -> train -> evaluate.

Every stage counts its own kept and rejected rows into tallies (pipelines/accounting.py) that `WriteShards` turns into
the manifest; the run ends by checking that every stage balances (input + expanded = kept + rejected + skipped) and
fails loudly if one does not.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import posixpath
import re
import uuid
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data_schemas import load_manifest, stage_balances
from pipelines.budget import RunBudget
from pipelines.cache import migrate_flat_files
from pipelines.config import EvaluateConfig, GenerateConfig, RunConfig
from pipelines.config_loading import ConfigError, config_to_dict
from pipelines.model_access import ModelAccess, RunModels
from pipelines.outputs import (
    ensure_folder,
    promote,
    remove_tree,
    replace_folder,
    sibling_staging_path,
    staging_path,
)
from pipelines.progress import LiveProgress
from pipelines.run_layout import MANIFEST_NAME, OUTPUT_KINDS
from pipelines.stages.embed_teacher import EmbedTeacher, RetrievalTexts
from pipelines.stages.generate_counterfactuals import GenerateCounterfactuals
from pipelines.stages.generate_queries import GenerateQueries
from pipelines.stages.grade_relevance import GradeRelevance
from pipelines.stages.mine_negatives import MineNegatives
from pipelines.stages.read_corpus import ReadCorpus
from pipelines.stages.write_shards import WriteShards
from prompts import prompt_versions

LOGGER = logging.getLogger(__name__)
#: Folder of the run's staging folder where the sharded searches write their spill files (pipelines/search_spill.py).
SEARCH_SPILL_FOLDER = ".search-spill"

STAGE_ORDER = ("read_corpus", "generate_queries", "embed_teacher", "grade_relevance", "mine_negatives",
               "generate_counterfactuals")
_VERSIONED_PACKAGES = ("apache-beam", "google-genai", "faiss-cpu", "pyarrow", "datasets", "torch", "transformers",
                       "sentence-transformers", "pydantic")


class GenerationFailed(RuntimeError):
    """The pipeline ran but its accounting does not balance: some rows went missing."""


def static_manifest(config: GenerateConfig, models: RunModels) -> dict[str, Any]:
    versions = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    budget = {key: float(value) for key, value in config_to_dict(config.budget).items() if value is not None}
    return {
        "run_id": uuid.uuid4().hex,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "embforge_version": importlib.metadata.version("embforge"),
        "package_versions": versions,
        "models": {"llm": models.llm.tag, "teacher": models.teacher.tag},
        "prompt_versions": prompt_versions(),
        "budget": budget,
        "config": config_to_dict(config),
    }


def build_generate_pipeline(pipeline: beam.Pipeline, config: GenerateConfig, output: str | None = None) -> None:
    """Add every generation stage, the shard writers and the manifest writer (into `output`, by default
    `config.output`) to `pipeline`."""
    cache_dir = config.cache_dir or None
    budget = None
    if config.budget.max_llm_calls is not None or config.budget.max_cost_usd is not None:
        # One budget for the run: each model-calling stage plans against what the stages applied before it spent.
        budget = RunBudget(config.budget.max_llm_calls, config.budget.max_cost_usd)
    models = RunModels.resolve(config.llm, config.teacher)
    llm = ModelAccess(config.llm, models.llm, cache_dir, budget)
    teacher = ModelAccess(config.teacher, models.teacher, cache_dir, budget)

    corpus = pipeline | "ReadCorpus" >> ReadCorpus(config.corpus)
    passages = corpus["kept"]
    queries = passages | "GenerateQueries" >> GenerateQueries(config.queries, llm)
    pairs = queries["kept"]
    texts = {"passages": passages, "pairs": pairs} | "TeacherTexts" >> RetrievalTexts()
    # Between query generation and grading on the budget's chain: its spend is planned against what query generation
    # left, and grading, mining and counterfactuals plan against what it spent.
    embedded = texts | "EmbedTeacher" >> EmbedTeacher(teacher, config.embed)
    vectors = embedded["kept"]
    # The searches spill their vectors into the run's staging folder: removed with it when the run is promoted, and
    # at the start of the next run if this one is killed.
    spill_root = posixpath.join(output or config.output, SEARCH_SPILL_FOLDER)
    graded = {"pairs": pairs, "vectors": vectors} | "GradeRelevance" >> GradeRelevance(
        config.grading, llm, select_candidates=config.queries.candidates > 1, shard_size=config.mining.shard_size,
        spill_root=spill_root)
    mined = {"pairs": graded["kept"], "passages": passages, "vectors": vectors} | "MineNegatives" >> MineNegatives(
        config.mining, llm, teacher=models.teacher, spill_root=spill_root)
    stages = [corpus, queries, embedded, graded, mined]
    rows = {"triplets": mined["kept"], "pairs": graded["kept"], "passages": passages}
    if config.counterfactuals is not None:
        # The run's teacher is the default label judge; its embeddings and the LLM judge's calls draw on the budget
        # after everything before them.
        classification = pipeline | "GenerateCounterfactuals" >> GenerateCounterfactuals(
            config.counterfactuals, llm, teacher=teacher, embed=config.embed)
        stages.append(classification)
        rows["classification"] = classification["kept"]

    # Every stage counts its own rows and usage (pipelines/accounting.py): the run only gathers them.
    rows["rejected"] = tuple(stage["rejected"] for stage in stages) | "AllRejected" >> beam.Flatten()
    tallies = tuple(stage["tallies"] for stage in stages) | "AllTallies" >> beam.Flatten()
    stage_order = STAGE_ORDER if config.counterfactuals is not None else STAGE_ORDER[:-1]
    {"rows": rows, "tallies": tallies} | "WriteShards" >> WriteShards(
        output or config.output, static_manifest(config, models), stage_order)


LOCAL_RUNNERS = ("DirectRunner", "direct", "FnApiRunner")


def pipeline_options(config: GenerateConfig) -> PipelineOptions:
    runner = config.beam.runner
    if runner in LOCAL_RUNNERS:
        # Beam's DirectRunner first tries to download the Prism runner binary from GitHub, then falls back to the
        # in-process FnApiRunner. Going to the FnApiRunner directly keeps local runs off the network; it honours the
        # same direct_running_mode / direct_num_workers options.
        runner = "FnApiRunner"
    flags = [f"--runner={runner}", *config.beam.options]
    if runner == "FnApiRunner":
        flags += [f"--direct_running_mode={config.beam.direct_running_mode}",
                  f"--direct_num_workers={config.beam.direct_num_workers}"]
    return PipelineOptions(flags=flags)


def check_writable(path: str, key: str) -> None:
    """Create `path` and write a probe file there, so an unreachable output fails before any model is loaded."""
    probe = posixpath.join(path, f".embforge-write-check-{uuid.uuid4().hex}")
    try:
        ensure_folder(path)
        with FileSystems.create(probe) as handle:
            handle.write(b"ok")
        FileSystems.delete([probe])
    except Exception as error:  # noqa: BLE001 - any filesystem's failure means the same to the user
        raise ConfigError(f"{key}: cannot write to {path!r} ({type(error).__name__}: {error})") from error


def generate(config: GenerateConfig) -> dict[str, Any]:
    """Run the generation pipeline to completion; returns the manifest. Raises GenerationFailed if rows went missing.

    The run writes into `<output>/.staging` and replaces the earlier run's shards and manifest only once it is complete
    and balanced (pipelines/outputs.py): a run that fails keeps the earlier one intact beside its own staging folder.
    """
    check_writable(config.output, "generate.output")
    if config.cache_dir:
        check_writable(config.cache_dir, "generate.cache_dir")
    staging = staging_path(config.output)
    # Whatever is there is the incomplete output of a run that failed or was killed.
    remove_tree(staging)
    pipeline = beam.Pipeline(options=pipeline_options(config))
    build_generate_pipeline(pipeline, config, staging)
    if config.cache_dir:
        # Once per cache, after every input has been checked while the pipeline was built: a cache from before
        # partitions is moved into them, so the stages' lookups (which list partitions as the pipeline runs) find it.
        migrate_flat_files(config.cache_dir)
    local = config.beam.runner in LOCAL_RUNNERS
    with LiveProgress(f"embforge generate -> {config.output}", enabled=local):
        pipeline.run().wait_until_finish()
    staged_manifest = posixpath.join(staging, MANIFEST_NAME)
    manifest = load_manifest(staged_manifest)
    _report(manifest)
    if manifest["stages"][0]["input"] == 0:
        raise GenerationFailed(f"the corpus {config.corpus.path!r} holds no rows: nothing to generate from")
    if not manifest["balanced"]:
        unbalanced = [stage["stage"] for stage in manifest["stages"] if not stage_balances(stage)]
        raise GenerationFailed(f"row accounting does not balance in stage(s) {', '.join(unbalanced)}: see "
                               f"{staged_manifest} (the earlier run in {config.output} is left as it was)")
    promote(staging, config.output, (*OUTPUT_KINDS, MANIFEST_NAME))
    return manifest


def _report(manifest: dict[str, Any]) -> None:
    LOGGER.info("stage balance (input + expanded = kept + rejected + skipped):")
    for stage in manifest["stages"]:
        LOGGER.info("  %-26s input %6d  +exp %5d  kept %6d  rejected %6d  skipped %6d  %s", stage["stage"],
                    stage["input"], stage["expanded"], stage["kept"], stage["rejected"], stage["skipped"],
                    json.dumps(stage["reasons"]))
    LOGGER.info("outputs: %s; cache: %s", json.dumps(manifest["outputs"]), json.dumps(manifest["cache"]))


#: "NAME=PATH": a name is a plain word, so a path that merely contains "=" (runs/lr=0.1) is not split.
_NAMED = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)=(?P<value>.+)$")


def _name_and_value(entry: str) -> tuple[str | None, str]:
    match = _NAMED.match(entry)
    return (match.group("name"), match.group("value")) if match else (None, entry)


def evaluation_tasks(config: EvaluateConfig) -> list:
    """The retrieval and classification tasks of `config`, checked: every file they need exists, names are unique."""
    from embedder.evaluate import ClassificationTask, RetrievalTask

    tasks: list = []
    for entry in config.retrieval:
        name, folder = _name_and_value(entry)
        needed = [posixpath.join(folder, "corpus.jsonl"), posixpath.join(folder, "queries.jsonl"),
                  posixpath.join(folder, "qrels", f"{config.retrieval_split}.tsv")]
        missing = [path for path in needed if not FileSystems.exists(path)]
        if missing:
            raise ConfigError(f"evaluate.retrieval {entry!r}: {missing[0]} not found (a BEIR folder holds "
                              f"corpus.jsonl, queries.jsonl and qrels/{config.retrieval_split}.tsv)")
        tasks.append(RetrievalTask(name=name or posixpath.basename(folder.rstrip("/")), data_dir=folder,
                                   split=config.retrieval_split))
    for entry in config.classification:
        name, files = _name_and_value(entry)
        train_path, comma, test_path = files.partition(",")
        if not comma or not train_path or not test_path:
            raise ConfigError(f"evaluate.classification {entry!r}: expected [NAME=]TRAIN,TEST")
        for path in (train_path, test_path):
            if not FileSystems.exists(path):
                raise ConfigError(f"evaluate.classification {entry!r}: {path} not found")
        tasks.append(ClassificationTask(name=name or posixpath.basename(train_path), train_path=train_path,
                                        test_path=test_path, text_field=config.text_field,
                                        label_field=config.label_field))
    names = [task.name for task in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"evaluate: two tasks are named {repeated[0]!r}; name them apart with NAME=...")
    return tasks


def _check_models_resolve(references: Iterable[str]) -> None:
    """Resolve each model a later step loads, so a missing package or path fails before any work."""
    from pipelines.clients.packaged_models import resolve_model

    for reference in references:
        resolve_model(reference)


def evaluated_embedder(model: str, max_seq_length: int | None):
    """The `Embedder` that `embforge evaluate` measures `model` (a path, a Hub id or packaged:<name>) with."""
    from embedder.quantized_model import QuantizedEmbedder, is_quantized_model
    from pipelines.clients.factory import build_embedder
    from pipelines.clients.specs import EmbedderSpec

    if is_quantized_model(model):
        # A folder `embforge quantize` wrote: embforge's own loader reads it (sentence-transformers cannot).
        return QuantizedEmbedder(model, max_seq_length=max_seq_length)
    return build_embedder(EmbedderSpec(backend="local", model=model, max_seq_length=max_seq_length))


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every model of `config` on every task; the report replaces `config.output`'s once it is complete."""
    from embedder.evaluate import evaluate_models

    tasks = evaluation_tasks(config)
    if not tasks:
        raise ConfigError("evaluate: nothing to evaluate on: give --retrieval [NAME=]BEIR_DIR or --classification "
                          "[NAME=]TRAIN,TEST (evaluate.retrieval / evaluate.classification in a config file)")
    if not config.models:
        raise ConfigError("evaluate: no model to evaluate: give --model NAME=MODEL (a path, a Hub id or "
                          "packaged:all-minilm-l6-v2) once per model")
    models = {name: evaluated_embedder(path, config.max_seq_length) for name, path in config.models.items()}
    staging = sibling_staging_path(config.output)
    remove_tree(staging)
    report = evaluate_models(models, tasks, config.dims, staging, int8=config.int8, binary=config.binary)
    replace_folder(staging, config.output)
    LOGGER.info("report: %s", posixpath.join(config.output, "report.md"))
    return report


def run_all(config: RunConfig, resume: bool = False) -> dict[str, Any]:
    """generate -> train (on all but the held-out queries) -> evaluate base vs trained, held-out queries included.

    What later steps need (evaluation data, the student and any extra models) is checked before generation starts.
    Each step replaces its earlier result only once it is complete. `resume` continues an interrupted training run.
    """
    from embedder.train import train
    from pipelines.holdout import corpus_passages, split_run

    train_config = config.train_config()
    if not evaluation_tasks(config.evaluate) and config.evaluate.holdout_fraction == 0:
        raise ConfigError("evaluate: nothing to evaluate on: set evaluate.holdout_fraction > 0, or give "
                          "evaluate.retrieval / evaluate.classification")
    _check_models_resolve([train_config.student, *config.evaluate.models.values()])

    generate(config.generate)
    data_dir = config.generate.output
    retrieval = config.evaluate.retrieval
    if config.evaluate.holdout_fraction > 0:
        corpus = corpus_passages(config.generate.corpus) if config.evaluate.holdout_corpus == "corpus" else None
        split = split_run(config.generate.output, config.evaluate.holdout_fraction, train_config.seed, corpus)
        LOGGER.info("held out %d queries for evaluation; training on %d triplets and %d classification examples",
                    split.eval_queries, split.train_triplets, split.train_classification)
        data_dir, retrieval = split.train_dir, (split.eval_dir, *retrieval)
    model_dir = train(train_config, data_dir, resume=resume)
    evaluation = replace(config.evaluate, retrieval=retrieval,
                         models={"base": train_config.student, "trained": model_dir, **config.evaluate.models})
    return evaluate(evaluation)
