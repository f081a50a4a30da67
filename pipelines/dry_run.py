"""`embforge generate --dry-run`: what a run would ask of its models, and what that would cost, before it runs.

It reads the corpus and the caches, then builds each stage's requests with the stages' own pure builders and keys them
with the cache keys the run would use; it never calls a model, loads no weights (a packaged model's version is read
from its files), and writes nothing.

What is exact and what is bounded:
- **Exact**: the passages (read, deduplicated and sampled as ReadCorpus does), query generation's requests, the
  teacher's passage texts, counterfactual generation's requests, and everything downstream of an answer the cache
  already holds (a cached query is judged with the stage's own filters, so its grading request and its embedding are
  known exactly too).
- **Upper bounds** where a count depends on answers not yet given: every missing query is assumed to pass its
  filters, every pair to pass grading, and mining's LLM scoring (which needs the teacher's search) to score
  `llm_candidates + 1` passages per pair. The table marks these with "<=".

Tokens are estimated at 4 characters a token (Google's rule of thumb for Gemini models), for the prompts as
rendered. An answer's output tokens are the mean of the cache's earlier answers to the same prompt and model when it
holds some, else the mean of the prompt's own few-shot example answers; a Gemini thinking budget adds its tokens to
each answer. Unknown query texts are taken at the mean length of the cached or example queries.

Cost is priced as the run would be (pipelines/pricing.py), online and in batch mode. Time assumes `concurrency`
requests in flight at the per-request latency of `ASSUMED_SECONDS`, and for local models their measured rate on a
2-core CPU; batch mode is up to the Batch API's 24 h turnaround.

How close it comes is measured in tests/test_dry_run.py: on the fake Gemini server counting ~4 characters a token,
the estimated tokens and cost of each stage against the manifest of the real run that follows.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.cache import (
    EMBEDDING_CACHE,
    LLM_CACHE,
    embedding_partition,
    llm_partition,
    partition_files,
    read_cache_keys,
)
from pipelines.clients.base import ChatMessage, TaskType, Usage
from pipelines.clients.gemini_thinking import gemini_thinking_budget
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.config import GenerateConfig
from pipelines.llm_calls import LLMAnswer, LLMRequest, answers_from_cache
from pipelines.model_access import RunModels
from pipelines.pricing import estimated_cost_micro_usd
from pipelines.run_layout import parquet_files, read_parquet
from pipelines.stages import generate_counterfactuals, generate_queries, grade_relevance
from pipelines.stages.candidate_scoring import build_llm_requests
from pipelines.stages.corpus_files import plan_corpus
from pipelines.stages.embed_teacher import embedding_cache_key
from pipelines.stages.label_judge import judge_request, prototype_texts, uses_llm, uses_teacher
from pipelines.stages.read_corpus import read_corpus_file, sample_key, split_first_occurrence
from pipelines.stages.task_spec import load_task_spec
from prompts import get_prompt, prompt_versions

#: Google documents about 4 characters a token for Gemini models; other tokenizers land near it for English prose.
CHARS_PER_TOKEN = 4
#: Seconds one request takes, by backend, when `concurrency` of them are in flight: a short JSON answer from
#: gemini-2.5-flash with thinking off, or one embeddings request, typically answers within this; local models are
#: their measured rate on 2 CPU cores (benchmarks/RESULTS.md: ~0.4 queries/s from SmolLM2-135M decoding batches of 8,
#: ~10 texts/s from all-mpnet-base-v2), which more cores speed up.
ASSUMED_SECONDS = {"llm": {"gemini": 2.0, "openai": 2.0, "custom": 2.0, "local": 2.5},
                   "embedding": {"gemini": 1.0, "custom": 0.1, "local": 0.1}}
#: Texts per embeddings request on Gemini (batchEmbedContents' limit); local embedders count per text.
TEXTS_PER_EMBEDDING_REQUEST = {"gemini": 100}
BATCH_TURNAROUND = "<= 24 h (Batch API target)"


def estimated_tokens(texts: Iterable[str]) -> int:
    return math.ceil(sum(len(text) for text in texts) / CHARS_PER_TOKEN)


def message_tokens(messages: Sequence[ChatMessage]) -> int:
    return estimated_tokens(message.content for message in messages)


@dataclass
class StageEstimate:
    """One stage's (or one of its parts') new requests, tokens, cost and time; `exact` False means upper bounds."""

    stage: str
    what: str
    requests: int = 0
    cached: int = 0
    exact: bool = True
    input_tokens: int = 0
    output_tokens: int = 0
    online_usd: float = 0.0
    batch_usd: float = 0.0
    online_seconds: float = 0.0


@dataclass
class DryRunEstimate:
    passages: int
    corpus_rows_rejected: int
    stages: list[StageEstimate]
    assumptions: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, float]:
        return {name: sum(getattr(stage, name) for stage in self.stages)
                for name in ("requests", "input_tokens", "output_tokens", "online_usd", "batch_usd", "online_seconds")}

    def as_dict(self) -> dict[str, Any]:
        return {"passages": self.passages, "corpus_rows_rejected": self.corpus_rows_rejected,
                "stages": [asdict(stage) for stage in self.stages], "totals": self.totals(),
                "assumptions": self.assumptions}


# --- Reading what the run would read ----------------------------------------------------------------------------------


def read_passages(config: GenerateConfig) -> tuple[list[dict[str, Any]], int]:
    """The passages ReadCorpus would keep (the first occurrence of each id by file path then position, by ReadCorpus's
    own rule, then the sample's smallest keys), and how many rows it would reject."""
    occurrences: dict[str, list[tuple[tuple[str, int], dict[str, Any]]]] = {}
    rejected = 0
    for corpus_file in plan_corpus(config.corpus.path, config.corpus.format):
        for index, outcome in enumerate(read_corpus_file(corpus_file, config.corpus)):
            if outcome.passage is None:
                rejected += 1
            else:
                occurrences.setdefault(outcome.passage["passage_id"], []).append(
                    ((corpus_file.path, index), outcome.passage))
    passages = []
    for passage_id, found in occurrences.items():
        first, duplicates = split_first_occurrence(passage_id, found)
        passages.append(first)
        rejected += len(duplicates)
    if config.corpus.sample is not None:
        passages = sorted(passages, key=lambda row: sample_key(config.corpus.seed, row["passage_id"]))
        passages = passages[: config.corpus.sample]
    return sorted(passages, key=lambda row: row["passage_id"]), rejected


@dataclass
class CacheIndex:
    """The keys a cache holds, and for LLM answers what the estimate reads back: the answers of query generation (to
    follow cached queries downstream) and every prompt's output tokens."""

    llm_entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    embedding_keys: set[str] = field(default_factory=set)
    output_tokens: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    @classmethod
    def read(cls, cache_dir: str | None, models: RunModels) -> CacheIndex:
        """The entries the run's models can hit: the LLM's answers to the current version of every prompt and the
        teacher's embeddings of every task type (their partitions, pipelines/cache.py), and a cache's files from
        before partitions (a run would move them into partitions first; a dry run writes nothing)."""
        index = cls()
        if not cache_dir:
            return index
        columns = ["key", "model_id", "prompt_name", "prompt_version", "response_json", "raw_answer",
                   "input_tokens", "output_tokens"]
        llm_files = [path for name, version in prompt_versions().items()
                     for path in partition_files(cache_dir, LLM_CACHE, llm_partition(*models.llm, name, version))]
        for path in [*llm_files, *parquet_files(posixpath.join(cache_dir, LLM_CACHE))]:
            for row in read_parquet(path, columns).to_pylist():
                index.llm_entries[row["key"]] = row
                index.output_tokens.setdefault((row["model_id"], row["prompt_name"]), []).append(
                    row["output_tokens"])
        embedding_files = [path for task_type in TaskType for path in partition_files(
            cache_dir, EMBEDDING_CACHE, embedding_partition(*models.teacher, task_type.value))]
        for path in [*embedding_files, *parquet_files(posixpath.join(cache_dir, EMBEDDING_CACHE))]:
            index.embedding_keys.update(read_cache_keys(path))
        return index


# --- Pricing one part of a stage --------------------------------------------------------------------------------------


class _Estimator:
    """Turns the requests and texts of each stage into `StageEstimate`s, against the cache, at the run's prices."""

    def __init__(self, config: GenerateConfig, models: RunModels, cache: CacheIndex):
        self.config = config
        self.models = models
        self.cache = cache
        self.assumptions: list[str] = []
        self._output_sources: dict[str, str] = {}

    def answer_tokens(self, prompt_name: str) -> int:
        """Output tokens of one answer to `prompt_name`: cached answers' mean, else the prompt's examples' mean."""
        spec = self.config.llm
        cached = self.cache.output_tokens.get((self.models.llm.model_id, prompt_name))
        if cached:
            tokens = math.ceil(sum(cached) / len(cached))
            source = f"mean of {len(cached)} cached answers"
        else:
            examples = get_prompt(prompt_name).examples
            tokens = max(1, estimated_tokens(example.answer for example in examples) // max(1, len(examples)))
            source = f"mean of the prompt's {len(examples)} example answers"
        self._output_sources.setdefault(prompt_name, f"{prompt_name}: {tokens} output tokens an answer ({source})")
        thinking = gemini_thinking_budget(spec.model_name, spec.thinking_budget) if spec.backend == "gemini" else None
        return tokens + max(thinking or 0, 0)

    def llm_part(self, stage: str, what: str, requests: Sequence[LLMRequest], exact: bool = True,
                 bounded: Sequence[LLMRequest] = ()) -> StageEstimate:
        """`requests` keyed against the cache; `bounded` are stand-ins for requests that may or may not be made."""
        spec = self.config.llm
        identity = self.models.llm
        misses: dict[str, LLMRequest] = {}
        cached = 0
        for request in requests:
            key = request.cache_key(*identity)
            if key in self.cache.llm_entries:
                cached += 1
            else:
                misses.setdefault(key, request)
        calls = [*misses.values(), *bounded]
        usage = Usage(sum(message_tokens(request.messages) + estimated_tokens(request.continuations)
                          for request in calls),
                      sum(self.answer_tokens(request.prompt_name) for request in calls if request.mode == "generate"))
        return self._priced(StageEstimate(stage, what, len(calls), cached, exact and not bounded),
                            spec, usage, "llm", len(calls))

    def embedding_part(self, stage: str, what: str, texts: Iterable[tuple[str, str]],
                       unknown: int = 0, unknown_tokens: int = 0) -> StageEstimate:
        """`texts` as (task type, text) keyed against the cache; `unknown` more texts of `unknown_tokens` each."""
        spec = self.config.teacher
        identity = self.models.teacher
        misses: dict[str, str] = {}
        cached = 0
        for task_type, text in texts:
            key = embedding_cache_key(*identity, task_type, self.config.embed.dimension, text)
            if key in self.cache.embedding_keys:
                cached += 1
            else:
                misses.setdefault(key, text)
        count = len(misses) + unknown
        usage = Usage(estimated_tokens(misses.values()) + unknown * unknown_tokens, 0)
        per_request = TEXTS_PER_EMBEDDING_REQUEST.get(spec.backend, 1)
        return self._priced(StageEstimate(stage, what, count, cached, unknown == 0), spec, usage, "embedding",
                            math.ceil(count / per_request))

    def _priced(self, estimate: StageEstimate, spec: LLMSpec | EmbedderSpec, usage: Usage, kind: str,
                requests: int) -> StageEstimate:
        estimate.input_tokens, estimate.output_tokens = usage.input_tokens, usage.output_tokens
        estimate.online_usd = estimated_cost_micro_usd(spec, usage, mode="online") / 1e6
        estimate.batch_usd = estimated_cost_micro_usd(spec, usage, mode="batch") / 1e6
        seconds = ASSUMED_SECONDS[kind].get(spec.backend, 1.0)
        in_flight = spec.concurrency if spec.backend in ("gemini", "openai") else 1
        estimate.online_seconds = requests * seconds / in_flight
        return estimate

    def notes(self) -> list[str]:
        return [*self._output_sources.values(), *self.assumptions]


# --- The stages, in run order -----------------------------------------------------------------------------------------


def _cached_answer(request: LLMRequest, entry: Mapping[str, Any]) -> LLMAnswer:
    return answers_from_cache([request], entry)[0]


def _known_pairs(requests: Sequence[LLMRequest], estimator: _Estimator, examples) -> tuple[list[dict], int]:
    """Pairs query generation keeps from answers the cache holds (judged with the stage's own filters), and how many
    requests have no cached answer (each may become one pair)."""
    config = estimator.config
    by_passage: dict[str, list[LLMAnswer]] = {}
    unanswered = 0
    for request in requests:
        entry = estimator.cache.llm_entries.get(request.cache_key(*estimator.models.llm))
        if entry is None:
            unanswered += 1
            continue
        by_passage.setdefault(request.context["passage"]["passage_id"], []).append(_cached_answer(request, entry))
    pairs = [row for answers in by_passage.values()
             for outcome, row in generate_queries.judge_answers(answers, config.queries, config.llm.model_name,
                                                                examples)
             if outcome == "kept"]
    return pairs, unanswered


def _typical_query(pairs: Sequence[Mapping[str, Any]]) -> str:
    """A stand-in query for requests whose query is not written yet: as long as the known ones, else the examples'."""
    queries = [pair["query"] for pair in pairs]
    if not queries:
        queries = [json.loads(example.answer)["query"] for example in get_prompt(generate_queries.PROMPT_NAME).examples]
    return "x" * (sum(len(query) for query in queries) // len(queries))


def _stand_in_pairs(passages: Sequence[Mapping[str, Any]], count: int, query: str) -> Iterator[dict[str, Any]]:
    """`count` pairs of an unknown query with the run's passages in turn: prompts of the right length to price."""
    for index in range(count):
        passage = passages[index % len(passages)]
        yield {"pair_id": f"unknown/{index}", "query": query, "passage_id": passage["passage_id"],
               "passage": passage["text"]}


def estimate(config: GenerateConfig) -> DryRunEstimate:
    """The dry run: every stage's new requests, tokens, cost and time, from the corpus and the caches alone."""
    models = RunModels.resolve(config.llm, config.teacher)
    cache = CacheIndex.read(config.cache_dir or None, models)
    estimator = _Estimator(config, models, cache)
    passages, rejected = read_passages(config)
    examples = generate_queries.load_examples(config.queries.examples) if config.queries.examples else None
    stages: list[StageEstimate] = []

    requests = [request for passage in passages
                for request in generate_queries.build_requests(passage, config.queries, examples)]
    stages.append(estimator.llm_part("generate_queries", "LLM calls", requests))
    pairs, unanswered = _known_pairs(requests, estimator, examples)
    query = _typical_query(pairs)

    texts = [(TaskType.RETRIEVAL_DOCUMENT.value, passage["text"]) for passage in passages]
    stages.append(estimator.embedding_part("embed_teacher", "passage texts", texts))
    stages.append(estimator.embedding_part(
        "embed_teacher", "query texts", [(TaskType.RETRIEVAL_QUERY.value, pair["query"]) for pair in pairs],
        unknown=unanswered, unknown_tokens=estimated_tokens([query])))

    stand_ins = list(_stand_in_pairs(passages, unanswered, query)) if passages else []
    if config.grading.use_llm:
        stages.append(estimator.llm_part(
            "grade_relevance", "LLM calls", [grade_relevance.build_request(pair, config.grading) for pair in pairs],
            bounded=[grade_relevance.build_request(pair, config.grading) for pair in stand_ins]))
    if config.mining.llm_scoring:
        mining = config.mining
        # Which passages are scored depends on the teacher's search: each pair's positive stands in for its candidates.
        scored = [request for pair in [*pairs, *stand_ins]
                  for request in build_llm_requests(pair, [(pair["passage_id"], pair["passage"])]
                                                    * mining.llm_candidates, query_likelihood=mining.query_likelihood)]
        stages.append(estimator.llm_part("mine_negatives", "LLM scoring calls", [], bounded=scored))
    if config.counterfactuals is not None:
        stages += _counterfactual_estimates(config, estimator)
    estimator.assumptions += [f"tokens at {CHARS_PER_TOKEN} characters each",
                              _time_assumption("LLM", "llm", config.llm),
                              _time_assumption("teacher", "embedding", config.teacher)]
    return DryRunEstimate(len(passages), rejected, stages, estimator.notes())


def _time_assumption(name: str, kind: str, spec: LLMSpec | EmbedderSpec) -> str:
    seconds = ASSUMED_SECONDS[kind].get(spec.backend, 1.0)
    if spec.backend in ("gemini", "openai"):
        per_request = TEXTS_PER_EMBEDDING_REQUEST.get(spec.backend, 1) if kind == "embedding" else 1
        texts = f" of up to {per_request} texts" if per_request > 1 else ""
        return f"online time: {name} at {seconds} s a request{texts}, {spec.concurrency} in flight"
    unit = "text" if kind == "embedding" else "answer"
    return f"online time: {name} ({spec.backend}) at {seconds} s per {unit} (2 CPU cores; faster on more, or a GPU)"


def _counterfactual_estimates(config: GenerateConfig, estimator: _Estimator) -> list[StageEstimate]:
    counterfactuals = config.counterfactuals
    assert counterfactuals is not None
    spec = load_task_spec(counterfactuals.task_spec)
    units = generate_counterfactuals.plan_units(spec, counterfactuals)
    requests = [generate_counterfactuals.build_request(unit, spec, counterfactuals) for unit in units]
    stage = generate_counterfactuals.STAGE
    estimates = [estimator.llm_part(stage, "LLM calls", requests)]
    # Every example asked for may reach the label judge: an upper bound on its calls and embeddings.
    candidates = sum(unit.count for unit in units)
    seed_text = "x" * (sum(len(seed.text) for seed in spec.seeds) // max(1, len(spec.seeds)))
    if uses_llm(counterfactuals.judge) and candidates:
        stand_in = judge_request({"row": {"example_id": "unknown", "text": seed_text}}, spec)
        estimates.append(estimator.llm_part(stage, "label judge calls", [], bounded=[stand_in] * candidates))
    if uses_teacher(counterfactuals.judge):
        prototypes = [(item["task_type"], item["text"]) for item in prototype_texts(spec)]
        estimates.append(estimator.embedding_part(stage, "label judge texts", prototypes, unknown=candidates,
                                                  unknown_tokens=estimated_tokens([seed_text])))
    return estimates


def compare_with_manifest(result: DryRunEstimate, manifest: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per stage, and for the whole run, estimate / actual of the new requests, input and output tokens and cost
    against the manifest of the run that followed the estimate (1.0 is exact; None where the run reports 0); how the
    estimate's accuracy is measured (benchmarks/dry_run_accuracy.py, tests/test_dry_run.py)."""
    actual: dict[str, dict[str, float]] = {}
    for row in manifest["llm_usage"]:
        actual[row["stage"]] = {"requests": row["calls"], "input_tokens": row["input_tokens"],
                                "output_tokens": row["output_tokens"], "cost": row["estimated_cost_usd"]}
    for row in manifest["embedding_usage"]:
        known = actual.setdefault(row["stage"], {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost": 0.0})
        known["requests"] += row["texts_embedded"]
        known["input_tokens"] += row["estimated_input_tokens"]
        known["cost"] += row["estimated_cost_usd"]
    estimated: dict[str, dict[str, float]] = {}
    for stage in result.stages:
        totals = estimated.setdefault(stage.stage, {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost": 0.0})
        totals["requests"] += stage.requests
        totals["input_tokens"] += stage.input_tokens
        totals["output_tokens"] += stage.output_tokens
        totals["cost"] += stage.online_usd
    for figures in (actual, estimated):
        figures["total"] = {name: sum(stage[name] for stage in list(figures.values())) for name in
                            ("requests", "input_tokens", "output_tokens", "cost")}
    return {stage: {name: (estimated[stage][name] / value if value else None)
                    for name, value in actual[stage].items()}
            for stage in actual if stage in estimated}


# --- Showing it -------------------------------------------------------------------------------------------------------


def format_table(result: DryRunEstimate, config: GenerateConfig) -> str:
    """The estimate as the CLI prints it: one row per stage part, totals, then what the figures assume."""
    header = ("stage", "what", "new requests", "cached", "input tokens", "output tokens", "online USD", "batch USD",
              "online time")
    rows = [header]
    for stage in result.stages:
        bound = "" if stage.exact else "<= "
        rows.append((stage.stage, stage.what, f"{bound}{stage.requests:,}", f"{stage.cached:,}",
                     f"{bound}{stage.input_tokens:,}", f"{bound}{stage.output_tokens:,}",
                     f"{bound}{stage.online_usd:,.4f}", f"{bound}{stage.batch_usd:,.4f}",
                     f"{bound}{_duration(stage.online_seconds)}"))
    totals = result.totals()
    rows.append(("total", "", f"{int(totals['requests']):,}", "", f"{int(totals['input_tokens']):,}",
                 f"{int(totals['output_tokens']):,}", f"{totals['online_usd']:,.4f}", f"{totals['batch_usd']:,.4f}",
                 _duration(totals["online_seconds"])))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [f"dry run: {result.passages:,} passages ({result.corpus_rows_rejected:,} corpus rows rejected); "
             f"LLM {config.llm.backend}:{config.llm.model_name}, teacher {config.teacher.backend}:"
             f"{config.teacher.model_name}; nothing was called or written"]
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) if column < 2 else cell.rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if index == 0 or index == len(rows) - 2:
            lines.append("  ".join("-" * width for width in widths))
    lines.append(f"batch mode: half of list, {BATCH_TURNAROUND}; '<=' marks upper bounds (answers not yet known)")
    lines += [f"- {note}" for note in result.assumptions]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
