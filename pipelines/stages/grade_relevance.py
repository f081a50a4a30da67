"""Stage 4, GradeRelevance: drop noisy generated pairs with two combinable graders.

Input: UNGRADED_PAIR rows (GenerateQueries' output), plus (when the round-trip grader is on) the run's teacher vectors,
from which the stage ranks each pair's positive for its query. Output: `{"kept": GRADED_PAIR rows, "rejected": REJECTED
rows, "answers": LLMAnswer, "tallies": the stage's rows and LLM usage}`; every input pair ends in exactly one of kept /
rejected, and a rejected pair keeps the scores and reasons that rejected it.

- LLM grading: the `relevance_grading` prompt returns a reason and a 0-3 grade; pairs below `llm_min_relevance` go.
  Measured here: the tiny local LLM's judgments are at chance, so offline runs default to round-trip only.
- Round-trip consistency (Promptagator): the positive must rank in the teacher's top `roundtrip_top_k` for its own
  query; the stage ranks it with the same exact sharded search the mining stage uses (pipelines/sharded_search.py),
  over the teacher's passage vectors, for the teacher's query vectors.

Candidates (`generate.queries.candidates` > 1, `select_candidates`): query generation wrote several candidate queries
per slot, all with the slot's `query_id`. Of the candidates of a slot that passed the graders, the least extractive
(the smallest share of word bigrams copied from the passage; the earlier candidate on a tie) is kept: the other
candidates are `surplus_candidate`. Without candidates every slot has one pair and nothing is selected.

Rejects: `llm_grading_failed` (raw answer kept), `skipped_by_budget` (never graded: the run's LLM budget was spent),
`llm_irrelevant`, `roundtrip_failed`, `surplus_candidate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from pipelines.accounting import CountRows, sum_tallies
from pipelines.clients.base import GenerationConfig, TaskType
from pipelines.llm_calls import CallLLM, LLMAnswer, LLMRequest, failure_reason
from pipelines.model_access import ModelAccess
from pipelines.sharded_search import ShardedTopK
from pipelines.stages import rejected_row, route
from pipelines.stages.embed_teacher import TeacherVectors
from pipelines.stages.generate_queries import candidate_number
from pipelines.text_matching import extractive_share
from prompts import get_prompt

STAGE = "grade_relevance"
PROMPT_NAME = "relevance_grading"


@dataclass(frozen=True)
class GradeRelevanceConfig:
    use_llm: bool = False
    use_roundtrip: bool = True
    #: 2 = "partially answers" on the prompt's 0-3 rubric: keeps pairs whose passage does answer the query.
    llm_min_relevance: int = 2
    #: Promptagator keeps a pair when its passage is the teacher's top hit; a small k tolerates near-duplicate passages.
    roundtrip_top_k: int = 3
    max_output_tokens: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.llm_min_relevance <= 3:
            raise ValueError(f"llm_min_relevance must be in 0..3, got {self.llm_min_relevance}")
        if self.roundtrip_top_k < 1:
            raise ValueError(f"roundtrip_top_k must be >= 1, got {self.roundtrip_top_k}")


def build_request(pair: dict[str, Any], config: GradeRelevanceConfig) -> LLMRequest:
    prompt = get_prompt(PROMPT_NAME)
    return LLMRequest(
        request_id=f"{pair['pair_id']}/grade",
        prompt_name=prompt.name,
        prompt_version=prompt.version,
        messages=prompt.render(query=pair["query"], passage=pair["passage"]),
        output_model=prompt.output_model,
        config=GenerationConfig(temperature=0.0, max_output_tokens=config.max_output_tokens),
        context=pair["pair_id"],
    )


def grade_pair(
    pair: dict[str, Any], answer: LLMAnswer | None, rank: int | None, config: GradeRelevanceConfig
) -> tuple[str, dict[str, Any]]:
    """("kept", GRADED_PAIR row) or ("rejected", REJECTED row) for one pair and the evidence about it.

    `rank` is the 1-based rank of the positive in the teacher's search for the query (None: not in the searched top).
    """
    graded = {**pair, "llm_relevance": None, "llm_reason": None, "roundtrip_rank": None}
    if config.use_llm:
        if answer is None or not answer.ok or answer.value is None:
            reason = failure_reason(answer, "llm_grading_failed") if answer else "llm_grading_failed"
            return "rejected", rejected_row(
                STAGE, reason, graded, record_id=pair["pair_id"],
                raw_answer=answer.raw if answer else None, detail=answer.error if answer else "no grading answer")
        graded["llm_relevance"] = float(answer.value["relevance"])
        graded["llm_reason"] = answer.value["reason"]
        if answer.value["relevance"] < config.llm_min_relevance:
            return "rejected", rejected_row(
                STAGE, "llm_irrelevant", graded, record_id=pair["pair_id"], raw_answer=answer.raw,
                detail=f"graded {answer.value['relevance']} < {config.llm_min_relevance}: {answer.value['reason']}")
    if config.use_roundtrip:
        graded["roundtrip_rank"] = rank
        if rank is None or rank > config.roundtrip_top_k:
            where = "outside the searched candidates" if rank is None else f"rank {rank}"
            return "rejected", rejected_row(
                STAGE, "roundtrip_failed", graded, record_id=pair["pair_id"],
                detail=f"the teacher puts the positive at {where} for its query (needs top {config.roundtrip_top_k})")
    return "kept", graded


def positive_rank(element: tuple[str, dict[str, list[Any]]]) -> Iterator[tuple[str, int | None]]:
    """(pair_id, {"hits": [the query's top hits], "pairs": [its positive's passage_id]}) -> (pair_id, 1-based rank of
    the positive among the hits, or None when it is not among them)."""
    pair_id, grouped = element
    for passage_id in grouped["pairs"]:
        ranked = [candidate for hits in grouped["hits"] for candidate, _ in hits]
        yield pair_id, (ranked.index(passage_id) + 1 if passage_id in ranked else None)


def select_candidate(graded: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The graded pairs of one slot (one `query_id`): ("kept", the least extractive) and ("rejected", each other one
    as `surplus_candidate`). Ties go to the earlier candidate, so the first (temperature 0) wins when all are equal."""
    ranked = sorted(
        ((extractive_share(pair["query"], pair["passage"]), candidate_number(pair), pair) for pair in graded),
        key=lambda item: item[:2])
    if not ranked:
        return
    best_share, _, best = ranked[0]
    yield "kept", best
    for share, _, pair in ranked[1:]:
        yield "rejected", rejected_row(
            STAGE, "surplus_candidate", pair, record_id=pair["pair_id"],
            detail=f"{share:.0%} of its word pairs come from the passage; {best['pair_id']} copies {best_share:.0%}")


class _GradeFn(beam.DoFn):
    def __init__(self, config: GradeRelevanceConfig):
        self._config = config

    def process(self, element) -> Iterator[Any]:
        _, grouped = element
        answers = list(grouped["answers"])
        ranks = list(grouped["ranks"])
        # Evidence without a pair (a key only in answers or ranks) yields nothing: the loop does not run.
        for pair in list(grouped["pairs"])[:1]:
            yield route(*grade_pair(pair, answers[0] if answers else None, ranks[0] if ranks else None, self._config))


class _SelectFn(beam.DoFn):
    def process(self, element) -> Iterator[Any]:
        _, graded = element
        for outcome, row in select_candidate(graded):
            yield route(outcome, row)


class GradeRelevance(beam.PTransform):
    """{"pairs": UNGRADED_PAIR rows, "vectors": the run's teacher vectors (EmbedTeacher's kept items; read only by the
    round trip)} -> kept / rejected / answers / tallies.

    `llm` serves the LLM grader. `select_candidates`: the pairs hold several candidates per `query_id`; keep one of
    each (see the module docstring). `shard_size`: passages per shard of the round trip's search (None: chosen from
    the corpus size, as MineNegatives chooses). `spill_root`: where that search spills its vectors (None: see
    `sharded_search.SearchShards`).
    """

    def __init__(self, config: GradeRelevanceConfig, llm: ModelAccess | None = None, select_candidates: bool = False,
                 shard_size: int | None = None, spill_root: str | None = None):
        super().__init__()
        if config.use_llm and llm is None:
            raise ValueError("GradeRelevance: use_llm needs an LLM spec")
        self._config = config
        self._llm = llm
        self._select_candidates = select_candidates
        self._shard_size = shard_size
        self._spill_root = spill_root

    def expand(self, inputs):
        entering = inputs["pairs"] | "CountInput" >> CountRows(STAGE, "input")
        pairs = entering["rows"]
        pipeline = pairs.pipeline
        tallies = [entering["tallies"]]
        if self._config.use_llm:
            assert self._llm is not None
            called = (
                pairs
                | "Requests" >> beam.Map(build_request, self._config)
                | "CallLLM" >> CallLLM(self._llm, STAGE)
            )
            answers = called["answers"]
            tallies.append(called["tallies"])
        else:
            answers = pipeline | "NoAnswers" >> beam.Create([])
        if self._config.use_roundtrip:
            ranks = self._round_trip_ranks(pairs, inputs["vectors"])
        else:
            ranks = pipeline | "NoRanks" >> beam.Create([])
        graded = (
            {
                "pairs": pairs | "KeyPairs" >> beam.Map(lambda pair: (pair["pair_id"], pair)),
                "answers": answers | "KeyAnswers" >> beam.Map(lambda answer: (answer.request.context, answer)),
                "ranks": ranks,
            }
            | "Join" >> beam.CoGroupByKey()
            | "Grade" >> beam.ParDo(_GradeFn(self._config)).with_outputs("rejected", main="kept")
        )
        kept, rejected = graded["kept"], graded["rejected"]
        if self._select_candidates:
            selected = (
                kept
                | "BySlot" >> beam.Map(lambda pair: (pair["query_id"], pair))
                | "GroupSlots" >> beam.GroupByKey()
                | "SelectCandidate" >> beam.ParDo(_SelectFn()).with_outputs("rejected", main="kept")
            )
            kept = selected["kept"]
            rejected = (rejected, selected["rejected"]) | "AllRejected" >> beam.Flatten()
        counted_kept = kept | "CountKept" >> CountRows(STAGE, "kept")
        counted_rejected = rejected | "CountRejected" >> CountRows(STAGE, "rejected")
        tallies += [counted_kept["tallies"], counted_rejected["tallies"]]
        return {"kept": counted_kept["rows"], "rejected": counted_rejected["rows"], "answers": answers,
                "tallies": sum_tallies(tallies)}

    def _round_trip_ranks(self, pairs, vectors):
        """(pair_id, rank of the pair's positive in the teacher's top `roundtrip_top_k` for its query, or None)."""
        hits = {
            "queries": vectors | "QueryVectors" >> TeacherVectors(TaskType.RETRIEVAL_QUERY),
            "passages": vectors | "PassageVectors" >> TeacherVectors(TaskType.RETRIEVAL_DOCUMENT),
        } | "RoundTripSearch" >> ShardedTopK(
            self._config.roundtrip_top_k, self._shard_size, stage=STAGE, spill_root=self._spill_root)
        return (
            {"hits": hits, "pairs": pairs | "PairPositive" >> beam.Map(lambda pair: (pair["pair_id"],
                                                                                       pair["passage_id"]))}
            | "JoinHits" >> beam.CoGroupByKey()
            | "Rank" >> beam.FlatMap(positive_rank)
        )
