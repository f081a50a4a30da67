"""Stage 2, GenerateQueries (Gecko): for each passage the LLM writes a retrieval task description and a query.

Input: PASSAGE rows. Output: `{"kept": UNGRADED_PAIR rows, "rejected": REJECTED rows, "tallies"}`. Each passage yields
`queries_per_passage` generation slots, each with a query type (question, keywords, claim, ...) rotated from a stable
hash of the passage id, so a corpus gets an even mix of types and re-runs make the same requests (and hit the cache).
With `candidates` = N the LLM is asked N times per slot (the first at `temperature`, the others sampled at
`candidate_temperature`, seeded per request); every candidate is judged here, and after grading GradeRelevance keeps
the least extractive candidate of each slot. So per passage, kept + rejected = queries_per_passage x candidates (the
manifest reports the fan-out as `expanded`). A kept row's `query_id` names its slot, its `pair_id` the candidate.

`examples` (a JSONL file of the user's own passages and queries, Promptagator) replaces the prompt's built-in few-shot
examples: each request shows `max_examples` of them, those of its query type first, chosen per passage from a stable
hash so different passages see different ones.

Rejects (reason codes): `llm_failed` (no valid answer after the backend's retries; raw answer kept),
`skipped_by_budget` (never called: the run's LLM budget was spent), `copies_example`
(the query repeats a few-shot example the prompt can show), `copies_passage` (the query is a verbatim stretch of the
passage, what a tiny LLM does zero-shot: docs/design.md), `copies_title` (the query is the passage's title, or part
of it, or it with little added), `copies_first_sentence` (the query is the passage's first sentence reworded),
`extractive` (most of the query's word pairs come from the passage; only with `max_extractive_share`),
`duplicate_query` (the same query as an earlier slot or candidate of the passage).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.accounting import TALLIES, CountingDoFn, CountRows, sum_tallies
from pipelines.clients.base import GenerationConfig
from pipelines.config_loading import ConfigError
from pipelines.llm_calls import CallLLM, LLMAnswer, LLMRequest, failure_reason
from pipelines.model_access import ModelAccess
from pipelines.stages import rejected_row, route
from pipelines.text_matching import (
    copies_example,
    extractive_share,
    first_sentence,
    longest_common_run,
    normalize,
    stable_hash,
    text_key,
    trigram_similarity,
    word_share,
)
from prompts import FewShotExample, get_prompt

STAGE = "generate_queries"
PROMPT_NAME = "query_generation"

# Copies of the title and of the first sentence: on SciFact most of the 135M model's queries are one or the other.
#: Character-trigram similarity from which a query is the title up to an inflection, punctuation or word order
#: ("cerebral organoid" for "Cerebral organoids": 0.84); a word added to a two-word title falls below (0.72).
TITLE_SIMILARITY = 0.8
#: A query made only of title words is (part of) the title once it holds half of the title's words ("getmembers" for
#: "inspect.getmembers"); fewer is a topic the title names among others ("organoids" of a ten-word title).
TITLE_PART_SHARE = 0.5
#: A query holding the whole title adds little to it when the title makes two thirds of its words ("cerebral organoids
#: review"); "what are cerebral organoids" (half) is a question about the title's topic and stays.
TITLE_IN_QUERY_SHARE = 2 / 3
#: Shorter queries are keyword queries, which pick passage words by nature: the built-in keywords example "metformin
#: type 2 diabetes" is four words of its passage's first sentence.
FIRST_SENTENCE_MIN_WORDS = 5
#: At most one distinct word in five that the first sentence lacks: that sentence reworded or reordered, not a
#: question or claim about it.
FIRST_SENTENCE_SHARE = 0.8
#: The 95th percentile of SciFact's first sentences is 58 words; a longer one is a list or code block the sentence split
#: missed, and measuring against it would reject any query made of the passage's words.
FIRST_SENTENCE_MAX_WORDS = 60


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
    #: Reject as `extractive` a query whose share of word bigrams found in its passage is above this (None: off).
    #: Extractive queries are the ones lexical matching already solves, so they teach a student least.
    max_extractive_share: float | None = None
    #: LLM answers per slot; after grading, the least extractive one that passed is kept (`surplus_candidate` for the
    #: rest). Each candidate is one more LLM call and teacher embedding.
    candidates: int = 1
    #: Sampling temperature of the candidates after the first (which uses `temperature`): varied, still on topic.
    candidate_temperature: float = 0.7
    #: JSON Lines file (any Beam filesystem) of up to 8 of the user's own examples, shown instead of the built-in ones:
    #: {"title": optional, "passage": ..., "query": ..., "query_type": optional ("question"), "task": optional}.
    examples: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.queries_per_passage < 1:
            raise ValueError(f"queries_per_passage must be >= 1, got {self.queries_per_passage}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.candidate_temperature <= 0:
            raise ValueError(f"candidate_temperature must be > 0 (candidates must differ), got "
                             f"{self.candidate_temperature}")
        if not self.query_types:
            raise ValueError("query_types must name at least one query type")
        if not 0 < self.copy_coverage <= 1:
            raise ValueError(f"copy_coverage must be in (0, 1], got {self.copy_coverage}")
        if self.max_extractive_share is not None and not 0 <= self.max_extractive_share < 1:
            raise ValueError(f"max_extractive_share must be in [0, 1) or unset, got {self.max_extractive_share}")
        from prompts.query_generation import QUERY_TYPES

        unknown = [query_type for query_type in self.query_types if query_type not in QUERY_TYPES]
        if unknown:
            raise ValueError(f"query type {unknown[0]!r} is unknown (known: {', '.join(QUERY_TYPES)})")

    @property
    def requests_per_passage(self) -> int:
        """LLM requests, hence judged rows, per passage: one per candidate of each slot."""
        return self.queries_per_passage * self.candidates


# --- A user's own few-shot examples -----------------------------------------------------------------------------------


def load_examples(path: str) -> tuple[FewShotExample, ...]:
    """The user's examples (`generate.queries.examples`), read through Beam FileSystems when the pipeline is built.

    Any problem is one ConfigError naming the file, line and field.
    """
    from prompts.query_generation import parse_user_examples

    where = f"generate.queries.examples: {path}"
    try:
        if not FileSystems.exists(path):
            raise ConfigError(f"{where}: not found")
        with FileSystems.open(path) as handle:
            data = handle.read()
    except ConfigError:
        raise
    except Exception as error:  # Beam wraps every filesystem's own error type; any of them means "cannot read"
        raise ConfigError(f"{where}: cannot read ({type(error).__name__})") from error
    try:
        return parse_user_examples(data)
    except ValueError as error:
        raise ConfigError(f"{where} {error}") from error


def examples_version(examples: Sequence[FewShotExample]) -> str:
    """A tag for the prompt version of requests showing `examples`: other examples, other tag (and cache keys)."""
    material = json.dumps([[list(example.inputs), example.answer] for example in examples], ensure_ascii=False)
    return "examples." + hashlib.sha256(material.encode()).hexdigest()[:12]


def choose_examples(
    examples: Sequence[FewShotExample], query_type: str, passage_id: str, seed: int, count: int
) -> tuple[FewShotExample, ...]:
    """`count` of the user's examples for one request: those of `query_type` first, each group ordered by a stable
    hash of the passage id and the example, so different passages see different examples and every run the same."""
    ranked = sorted(examples, key=lambda example: (example.fields["query_type"] != query_type,
                                                   stable_hash(seed, passage_id, example.inputs, example.answer)))
    return tuple(ranked[:count])


# --- Requests ---------------------------------------------------------------------------------------------------------


def query_types_for(passage_id: str, config: GenerateQueriesConfig) -> list[str]:
    offset = stable_hash(config.seed, passage_id) % len(config.query_types)
    return [config.query_types[(offset + slot) % len(config.query_types)] for slot in range(config.queries_per_passage)]


def slot_id(passage_id: str, slot: int) -> str:
    """The id of a generation slot: the `query_id` of every candidate of the slot."""
    return f"{passage_id}::q{slot}"


def candidate_id(passage_id: str, slot: int, candidate: int) -> str:
    """The request and `pair_id` of one candidate. The first candidate's is the slot's own id, as before candidates
    existed, so earlier runs' rows keep their ids."""
    return slot_id(passage_id, slot) + (f"c{candidate}" if candidate else "")


def candidate_number(pair: dict[str, Any]) -> int:
    """Which candidate of its slot an UNGRADED_PAIR row is (0 for the first), read back from its ids."""
    suffix = pair["pair_id"][len(pair["query_id"]):]
    return int(suffix[1:]) if suffix else 0


def _generation(config: GenerateQueriesConfig, passage_id: str, slot: int, candidate: int) -> GenerationConfig:
    if candidate == 0:
        return GenerationConfig(temperature=config.temperature, max_output_tokens=config.max_output_tokens,
                                seed=config.seed if config.temperature > 0 else None)
    # Seeded per request: a candidate samples the same answer in every run, so re-runs hit the cache.
    return GenerationConfig(temperature=config.candidate_temperature, max_output_tokens=config.max_output_tokens,
                            seed=stable_hash(config.seed, passage_id, slot, candidate) % 2**31)


def build_requests(
    passage: dict[str, Any], config: GenerateQueriesConfig, examples: Sequence[FewShotExample] | None = None
) -> list[LLMRequest]:
    """One request per candidate of each slot; `examples` (the user's own) replace the prompt's built-in ones."""
    prompt = get_prompt(PROMPT_NAME)
    version = prompt.version if examples is None else f"{prompt.version}+{examples_version(examples)}"
    passage_id = passage["passage_id"]
    requests = []
    for slot, query_type in enumerate(query_types_for(passage_id, config)):
        fields = {"passage": passage["text"], "title": passage["title"] or "", "query_type": query_type}
        if examples is None:
            messages = prompt.render(**fields)
        else:
            shown = choose_examples(examples, query_type, passage_id, config.seed, prompt.max_examples)
            messages = prompt.render_with(shown, **fields)
        for candidate in range(config.candidates):
            requests.append(LLMRequest(
                request_id=candidate_id(passage_id, slot, candidate),
                prompt_name=prompt.name,
                prompt_version=version,
                messages=messages,
                output_model=prompt.output_model,
                config=_generation(config, passage_id, slot, candidate),
                context={"passage": passage, "slot": slot, "candidate": candidate, "query_type": query_type},
            ))
    return requests


# --- Judging answers (pure) -------------------------------------------------------------------------------------------


def copies_passage(query: str, passage: str, config: GenerateQueriesConfig) -> bool:
    query_words, passage_words = normalize(query), normalize(passage)
    if not query_words:
        return False
    if query_words == passage_words:
        return True
    run = longest_common_run(query_words, passage_words)
    return run >= config.copy_min_words and run >= config.copy_coverage * len(query_words)


def copies_title(query: str, title: str | None) -> bool:
    """The query is the title (up to an inflection or word order), part of it, or it with little added."""
    query_words, title_words = set(normalize(query)), set(normalize(title or ""))
    if not query_words or not title_words:
        return False
    shared = len(query_words & title_words)
    return (
        trigram_similarity(query, title or "") >= TITLE_SIMILARITY
        or (shared == len(query_words) and shared >= TITLE_PART_SHARE * len(title_words))
        or (shared == len(title_words) and shared >= TITLE_IN_QUERY_SHARE * len(query_words))
    )


def copies_first_sentence(query: str, passage: str) -> bool:
    """Nearly all of the query's words are in the passage's first sentence (in any order): a near-copy of it."""
    query_words = normalize(query)
    if len(query_words) < FIRST_SENTENCE_MIN_WORDS:
        return False
    sentence_words = normalize(first_sentence(passage))[:FIRST_SENTENCE_MAX_WORDS]
    return word_share(query_words, sentence_words) >= FIRST_SENTENCE_SHARE


def few_shot_queries(examples: Sequence[FewShotExample] | None = None) -> tuple[str, ...]:
    """Queries of every few-shot example the prompt can show: the user's `examples`, else the built-in."""
    shown = get_prompt(PROMPT_NAME).examples if examples is None else examples
    return tuple(json.loads(example.answer)["query"] for example in shown)


def _copy_reason(query: str, passage: dict[str, Any], config: GenerateQueriesConfig) -> tuple[str, str] | None:
    """(reason, detail) when the query copies the passage, its title or first sentence, or is too extractive."""
    if copies_passage(query, passage["text"], config):
        return "copies_passage", "the query is a verbatim stretch of the passage"
    if copies_title(query, passage["title"]):
        return "copies_title", "the query is the passage's title, part of it, or it with little added"
    if copies_first_sentence(query, passage["text"]):
        return "copies_first_sentence", "the query is the passage's first sentence, reworded"
    if config.max_extractive_share is not None:
        share = extractive_share(query, passage["text"])
        if share > config.max_extractive_share:
            return "extractive", (f"{share:.0%} of the query's word pairs come from the passage (at most "
                                  f"{config.max_extractive_share:.0%} allowed)")
    return None


def judge_answers(
    answers: Iterable[LLMAnswer], config: GenerateQueriesConfig, llm_model: str,
    examples: Sequence[FewShotExample] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Turn one passage's answers into ("kept", UNGRADED_PAIR row) or ("rejected", REJECTED row), in slot, then
    candidate order.

    `examples` are the user's few-shot examples when the prompt showed those instead of the built-in ones.
    """
    example_queries = few_shot_queries(examples)
    seen: set[str] = set()
    for answer in sorted(answers, key=lambda item: (item.request.context["slot"], item.request.context["candidate"])):
        context = answer.request.context
        passage = context["passage"]
        record = {"request_id": answer.request.request_id, "query_type": context["query_type"], "passage": passage,
                  "candidate": context["candidate"], "answer": answer.value}
        if not answer.ok or answer.value is None:
            yield "rejected", rejected_row(STAGE, failure_reason(answer, "llm_failed"), record,
                                           record_id=answer.request.request_id, raw_answer=answer.raw,
                                           detail=answer.error)
            continue
        query = answer.value["query"]
        key = text_key(query)
        if copies_example(query, example_queries):
            problem = "copies_example", "the query repeats a few-shot example of the prompt"
        else:
            problem = _copy_reason(query, passage, config)
        if problem is None and key in seen:
            problem = "duplicate_query", "an earlier slot or candidate of this passage produced the same query"
        if problem:
            reason, detail = problem
            yield "rejected", rejected_row(STAGE, reason, record, record_id=answer.request.request_id,
                                           raw_answer=answer.raw, detail=detail)
            continue
        seen.add(key)
        yield "kept", {
            "pair_id": answer.request.request_id,
            "query_id": slot_id(passage["passage_id"], context["slot"]),
            "query": query,
            "query_type": context["query_type"],
            "task": answer.value["task"],
            "passage_id": passage["passage_id"],
            "passage": passage["text"],
            "llm_model": llm_model,
            "prompt_version": f"{answer.request.prompt_name}@{answer.request.prompt_version}",
        }


class _RequestsFn(CountingDoFn):
    """A passage -> its requests: one input row fanned out to one row per request (the rest counted as `expanded`)."""

    def __init__(self, config: GenerateQueriesConfig, examples: tuple[FewShotExample, ...] | None):
        super().__init__(STAGE)
        self._config = config
        self._examples = examples

    def process(self, passage: dict[str, Any]) -> Iterator[Any]:
        requests = build_requests(passage, self._config, self._examples)
        self.tally.count("expanded", len(requests) - 1)
        yield from requests


class _JudgeFn(beam.DoFn):
    def __init__(self, config: GenerateQueriesConfig, llm_model: str, examples: tuple[FewShotExample, ...] | None):
        self._config = config
        self._llm_model = llm_model
        self._examples = examples

    def process(self, element):
        _, answers = element
        for outcome, row in judge_answers(answers, self._config, self._llm_model, self._examples):
            yield route(outcome, row)


class GenerateQueries(beam.PTransform):
    """PASSAGE rows -> {"kept": UNGRADED_PAIR rows, "rejected": REJECTED rows, "answers": LLMAnswer, "tallies": the
    stage's rows and LLM usage}.

    The user's examples file (`config.examples`) is read here, while the pipeline is built: a bad file is a
    ConfigError before any work.
    """

    def __init__(self, config: GenerateQueriesConfig, llm: ModelAccess):
        super().__init__()
        self._config = config
        self._llm = llm
        self._examples = load_examples(config.examples) if config.examples else None

    def expand(self, passages):
        entering = passages | "CountInput" >> CountRows(STAGE, "input")
        requests = entering["rows"] | "Requests" >> beam.ParDo(_RequestsFn(self._config, self._examples)).with_outputs(
            TALLIES, main="requests")
        called = requests["requests"] | "CallLLM" >> CallLLM(self._llm, STAGE)
        answers = called["answers"]
        judged = (
            answers
            | "ByPassage" >> beam.Map(lambda answer: (answer.request.context["passage"]["passage_id"], answer))
            | "Group" >> beam.GroupByKey()
            | "Judge" >> beam.ParDo(_JudgeFn(self._config, self._llm.spec.model_name, self._examples)).with_outputs(
                "rejected", main="kept")
        )
        kept = judged["kept"] | "CountKept" >> CountRows(STAGE, "kept")
        rejected = judged["rejected"] | "CountRejected" >> CountRows(STAGE, "rejected")
        tallies = sum_tallies((entering["tallies"], requests[TALLIES], called["tallies"], kept["tallies"],
                               rejected["tallies"]))
        return {"kept": kept["rows"], "rejected": rejected["rows"], "answers": answers, "tallies": tallies}
