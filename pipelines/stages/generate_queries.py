"""Stage 2, GenerateQueries (Gecko): for each passage the LLM writes a retrieval task description and a query.

Input: PASSAGE rows. Output: `{"kept": PAIR rows, "rejected": REJECTED rows}`. Each passage yields
`queries_per_passage` generation slots, each with a query type (question, keywords, claim, ...) rotated from a stable
hash of the passage id, so a corpus gets an even mix of types and re-runs make the same requests (and hit the cache).
So per passage, kept + rejected = queries_per_passage (the manifest reports the fan-out as `expanded`).

Rejects (reason codes): `llm_failed` (no valid answer after the backend's retries; raw answer kept),
`skipped_by_budget` (never called: the run's LLM budget was spent), `copies_example`
(the query repeats a few-shot example of the prompt), `copies_passage` (the query is a verbatim stretch of the passage,
the tiny-model failure mode DESIGN.md describes), `duplicate_query` (the same query as an earlier slot of the passage).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from pipelines.clients.base import GenerationConfig
from pipelines.clients.factory import LLMSpec
from pipelines.llm_calls import CallLLM, LLMAnswer, LLMRequest, RunBudget, failure_reason
from pipelines.stages import StageCounters, normalize, rejected_row, stable_hash
from prompts import get_prompt

STAGE = "generate_queries"
PROMPT_NAME = "query_generation"


@dataclass(frozen=True)
class GenerateQueriesConfig:
    queries_per_passage: int = 1
    #: Query types rotated over the corpus; each must be one the query_generation prompt has examples for.
    query_types: tuple[str, ...] = ("question", "keywords", "claim")
    temperature: float = 0.0
    max_output_tokens: int = 96
    #: A query sharing a verbatim word run this long with the passage, covering most of the query, is a copy.
    copy_min_words: int = 5
    #: Share of the query's words that must lie in one verbatim run of the passage to call it a copy.
    copy_coverage: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.queries_per_passage < 1:
            raise ValueError(f"queries_per_passage must be >= 1, got {self.queries_per_passage}")
        if not self.query_types:
            raise ValueError("query_types must name at least one query type")
        if not 0 < self.copy_coverage <= 1:
            raise ValueError(f"copy_coverage must be in (0, 1], got {self.copy_coverage}")
        from prompts.query_generation import QUERY_TYPES

        unknown = [query_type for query_type in self.query_types if query_type not in QUERY_TYPES]
        if unknown:
            raise ValueError(f"query type {unknown[0]!r} is unknown (known: {', '.join(QUERY_TYPES)})")


def query_types_for(passage_id: str, config: GenerateQueriesConfig) -> list[str]:
    offset = stable_hash(config.seed, passage_id) % len(config.query_types)
    return [config.query_types[(offset + slot) % len(config.query_types)] for slot in range(config.queries_per_passage)]


def build_requests(passage: dict[str, Any], config: GenerateQueriesConfig) -> list[LLMRequest]:
    prompt = get_prompt(PROMPT_NAME)
    generation = GenerationConfig(temperature=config.temperature, max_output_tokens=config.max_output_tokens,
                                  seed=config.seed if config.temperature > 0 else None)
    requests = []
    for slot, query_type in enumerate(query_types_for(passage["passage_id"], config)):
        messages = prompt.render(passage=passage["text"], title=passage["title"] or "", query_type=query_type)
        requests.append(LLMRequest(
            request_id=f"{passage['passage_id']}::q{slot}",
            prompt_name=prompt.name,
            prompt_version=prompt.version,
            messages=messages,
            output_model=prompt.output_model,
            config=generation,
            context={"passage": passage, "slot": slot, "query_type": query_type},
        ))
    return requests


def longest_common_run(query_words: list[str], passage_words: list[str]) -> int:
    """Length of the longest run of consecutive words the query shares verbatim with the passage."""
    best = 0
    previous = [0] * (len(passage_words) + 1)
    for query_word in query_words:
        current = [0] * (len(passage_words) + 1)
        for index, passage_word in enumerate(passage_words, start=1):
            if query_word == passage_word:
                current[index] = previous[index - 1] + 1
                best = max(best, current[index])
        previous = current
    return best


def copies_passage(query: str, passage: str, config: GenerateQueriesConfig) -> bool:
    query_words, passage_words = normalize(query), normalize(passage)
    if not query_words:
        return False
    if query_words == passage_words:
        return True
    run = longest_common_run(query_words, passage_words)
    return run >= config.copy_min_words and run >= config.copy_coverage * len(query_words)


def few_shot_queries() -> frozenset[tuple[str, ...]]:
    """Normalized queries of every few-shot example the prompt can show."""
    examples = get_prompt(PROMPT_NAME).examples
    return frozenset(tuple(normalize(json.loads(example.answer)["query"])) for example in examples)


def judge_answers(
    answers: Iterable[LLMAnswer], config: GenerateQueriesConfig, llm_model: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Turn one passage's answers into ("kept", PAIR row) or ("rejected", REJECTED row), in slot order."""
    examples = few_shot_queries()
    seen: set[tuple[str, ...]] = set()
    for answer in sorted(answers, key=lambda item: item.request.context["slot"]):
        context = answer.request.context
        passage = context["passage"]
        record = {"request_id": answer.request.request_id, "query_type": context["query_type"], "passage": passage,
                  "answer": answer.value}
        if not answer.ok or answer.value is None:
            yield "rejected", rejected_row(STAGE, failure_reason(answer, "llm_failed"), record,
                                           record_id=answer.request.request_id, raw_answer=answer.raw,
                                           detail=answer.error)
            continue
        query = answer.value["query"]
        words = tuple(normalize(query))
        reason = None
        if words in examples:
            reason, detail = "copies_example", "the query repeats a few-shot example of the prompt"
        elif copies_passage(query, passage["text"], config):
            reason, detail = "copies_passage", "the query is a verbatim stretch of the passage"
        elif words in seen:
            reason, detail = "duplicate_query", "an earlier slot of this passage produced the same query"
        if reason:
            yield "rejected", rejected_row(STAGE, reason, record, record_id=answer.request.request_id,
                                           raw_answer=answer.raw, detail=detail)
            continue
        seen.add(words)
        yield "kept", {
            "pair_id": answer.request.request_id,
            "query_id": answer.request.request_id,
            "query": query,
            "query_type": context["query_type"],
            "task": answer.value["task"],
            "passage_id": passage["passage_id"],
            "passage": passage["text"],
            "llm_model": llm_model,
            "prompt_version": f"{answer.request.prompt_name}@{answer.request.prompt_version}",
        }


class _JudgeFn(beam.DoFn):
    def __init__(self, config: GenerateQueriesConfig, llm_model: str):
        self._config = config
        self._llm_model = llm_model
        self._counters = StageCounters(STAGE)

    def process(self, element):
        _, answers = element
        for outcome, row in judge_answers(answers, self._config, self._llm_model):
            yield self._counters.route(outcome, row)


class GenerateQueries(beam.PTransform):
    """PASSAGE rows -> {"kept": PAIR rows, "rejected": REJECTED rows, "answers": LLMAnswer (for usage accounting)}."""

    def __init__(self, config: GenerateQueriesConfig, llm: LLMSpec, cache_dir: str | None = None,
                 budget: RunBudget | None = None):
        super().__init__()
        self._config = config
        self._llm = llm
        self._cache_dir = cache_dir
        self._budget = budget

    def expand(self, passages):
        answers = (
            passages
            | "Requests" >> beam.FlatMap(build_requests, self._config)
            | "CallLLM" >> CallLLM(self._llm, STAGE, self._cache_dir, self._budget)
        )
        judged = (
            answers
            | "ByPassage" >> beam.Map(lambda answer: (answer.request.context["passage"]["passage_id"], answer))
            | "Group" >> beam.GroupByKey()
            | "Judge" >> beam.ParDo(_JudgeFn(self._config, self._llm.model_name)).with_outputs("rejected", main="kept")
        )
        return {"kept": judged["kept"], "rejected": judged["rejected"], "answers": answers}
