"""The run configuration: one frozen dataclass per section, composed from each stage's own config.

The offline default (`pipelines/defaults.toml`, used when no file is given) needs no API key and no network: local LLM,
local teacher, the built-in Python-stdlib corpus. A user file is layered over those defaults, then `--set` overrides.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Literal

from embedder.config import TrainConfig
from pipelines.clients.specs import API_KEY_VARIABLES, OPENAI_API_KEY_VARIABLE, EmbedderSpec, LLMSpec
from pipelines.config_loading import ConfigError, apply_overrides, build_config, read_config_file
from pipelines.stages.embed_teacher import EmbedTeacherConfig
from pipelines.stages.generate_counterfactuals import GenerateCounterfactualsConfig
from pipelines.stages.generate_queries import GenerateQueriesConfig
from pipelines.stages.grade_relevance import GradeRelevanceConfig
from pipelines.stages.mine_negatives import MineNegativesConfig
from pipelines.stages.read_corpus import ReadCorpusConfig


@dataclass(frozen=True)
class BeamConfig:
    runner: str = "DirectRunner"
    #: DirectRunner modes; multi_processing is the check that every stage pickles as Dataflow requires.
    direct_running_mode: Literal["in_memory", "multi_threading", "multi_processing"] = "in_memory"
    direct_num_workers: int = 1
    #: Extra Beam pipeline options, e.g. ["--project=P", "--region=R", "--temp_location=gs://b/tmp"].
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.direct_num_workers < 1:
            raise ValueError(f"direct_num_workers must be >= 1, got {self.direct_num_workers}")


@dataclass(frozen=True)
class BudgetConfig:
    """Limits on the whole run's new LLM calls (cache hits are free), across every LLM stage.

    Exact on any runner: each stage calls a deterministic subset of its cache misses that fits what earlier stages
    left, and the rest become rejected rows counted as skipped_by_budget (pipelines/budget.py says how).
    """

    max_llm_calls: int | None = None
    #: Estimated USD at list prices (pipelines/pricing.py); each call is planned at its worst case (prompt at
    #: bytes / 3 tokens, answer at max_output_tokens), so the estimated spend stays under it. Local models cost 0.
    max_cost_usd: float | None = None

    def __post_init__(self) -> None:
        if self.max_llm_calls is not None and self.max_llm_calls < 0:
            raise ValueError(f"max_llm_calls must be >= 0, got {self.max_llm_calls}")
        if self.max_cost_usd is not None and self.max_cost_usd < 0:
            raise ValueError(f"max_cost_usd must be >= 0, got {self.max_cost_usd}")


@dataclass(frozen=True)
class GenerateConfig:
    output: str = "runs/offline"
    #: Content-addressed cache of LLM answers and teacher embeddings; local path or gs://.
    cache_dir: str = ".embforge-cache"
    corpus: ReadCorpusConfig = field(default_factory=ReadCorpusConfig)
    llm: LLMSpec = field(default_factory=LLMSpec)
    teacher: EmbedderSpec = field(default_factory=EmbedderSpec)
    embed: EmbedTeacherConfig = field(default_factory=EmbedTeacherConfig)
    queries: GenerateQueriesConfig = field(default_factory=GenerateQueriesConfig)
    grading: GradeRelevanceConfig = field(default_factory=GradeRelevanceConfig)
    mining: MineNegativesConfig = field(default_factory=MineNegativesConfig)
    #: Classification data from a task spec; off unless a spec is given.
    counterfactuals: GenerateCounterfactualsConfig | None = None
    beam: BeamConfig = field(default_factory=BeamConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    #: name -> model (Hub id, path or packaged:<name>); `embforge run` adds the base student and the trained one.
    models: dict[str, str] = field(default_factory=dict)
    #: BEIR-format folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) to evaluate retrieval on, each as
    #: "DIR" or "NAME=DIR" (the name heads its table in the report; default: the folder's name).
    retrieval: tuple[str, ...] = ()
    retrieval_split: str = "test"
    #: Classification sets as "TRAIN,TEST" or "NAME=TRAIN,TEST": CSV, TSV or JSON Lines files, gzipped or not, with
    #: `text_field` and `label_field` columns.
    classification: tuple[str, ...] = ()
    text_field: str = "text"
    label_field: str = "label"
    dims: tuple[int, ...] = (384, 256, 128, 64)
    int8: bool = True
    #: Binary output embeddings too (retrieval): sign bits with Hamming search, alone and with float rescoring.
    binary: bool = False
    #: Tokens every model reads per text (its window), the same for all so that none wins by reading more of a
    #: passage; 256 is all-MiniLM-L6-v2's own window. None: each model's own window (the report states each).
    max_seq_length: int | None = 256
    #: `embforge run`: share of generated queries held out of training and evaluated as a BEIR set (0 = none).
    holdout_fraction: float = 0.2
    #: `embforge run`: what the held-out queries are searched: "corpus" (every passage of generate.corpus, the sample
    #: or not; a query must find its passage among all the distractors a user's search would meet) or "run" (only the
    #: passages the run sampled: cheaper for a corpus too large to embed for evaluation).
    holdout_corpus: Literal["corpus", "run"] = "corpus"
    #: Report folder (any Beam filesystem); empty: `<generate.output>/report`.
    output: str = ""

    def __post_init__(self) -> None:
        if list(self.dims) != sorted(self.dims, reverse=True) or len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims must be strictly descending, got {list(self.dims)}")
        if any(dim < 1 for dim in self.dims):
            raise ValueError(f"dims must be positive, got {list(self.dims)}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.max_seq_length is not None and self.max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1 or unset, got {self.max_seq_length}")


@dataclass(frozen=True)
class RunConfig:
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    #: TrainConfig's fields (embedder/config.py); validated by TrainConfig itself.
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def train_config(self) -> TrainConfig:
        """The trainer's config; its output_dir defaults to `<generate.output>/student`."""
        try:
            values = {"output_dir": posixpath.join(self.generate.output, "student"), **self.train}
            return TrainConfig.from_dict(values).validate()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"train: {error}") from error


def default_config_data() -> dict[str, Any]:
    return read_config_file(str(resources.files("pipelines") / "defaults.toml"))


def _merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def check_environment(config: RunConfig) -> None:
    """Problems only the environment reveals, reported before any work starts."""
    uses_gemini = config.generate.llm.backend == "gemini" or config.generate.teacher.backend == "gemini"
    if uses_gemini and not any(os.environ.get(name) for name in API_KEY_VARIABLES):
        raise ConfigError(f"the gemini backend needs an API key in {' or '.join(API_KEY_VARIABLES)}")
    llm = config.generate.llm
    if llm.backend == "openai" and llm.base_url is None and not os.environ.get(OPENAI_API_KEY_VARIABLE, "").strip():
        raise ConfigError(f"the openai backend without generate.llm.base_url talks to OpenAI itself, which needs a key "
                          f"in {OPENAI_API_KEY_VARIABLE}; for your own server set generate.llm.base_url")


def load_run_config(path: str | None, overrides: list[str], beam_args: list[str] | None = None) -> RunConfig:
    """Defaults, then the file, then overrides; every problem is one ConfigError naming the file and key."""
    data = default_config_data()
    source = "defaults"
    if path:
        data = _merge(data, read_config_file(path))
        source = path
    data = apply_overrides(data, overrides)
    try:
        config = build_config(RunConfig, data, where="")
        config.train_config()
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error
    if not config.evaluate.output:
        config = replace(config, evaluate=replace(config.evaluate,
                                                  output=posixpath.join(config.generate.output, "report")))
    if beam_args:
        generate = config.generate
        config = replace(config, generate=replace(
            generate, beam=replace(generate.beam, options=generate.beam.options + tuple(beam_args))))
    try:
        check_environment(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error
    return config
