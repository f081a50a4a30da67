"""LLM scoring of mining candidates (Gecko): the requests that ask for it, one answer reduced to a judgement, the
signals fused by reciprocal rank fusion, and the decision to relabel a pair's positive. Pure functions that
MineNegatives applies; apart from the stage so its search, selection and Beam plumbing read on their own.

LLM decisions, and why:

- Relevance grades use the 0-3 scale of `negative_scoring`. A candidate graded `llm_relevant_grade` (2, "partially
  answers") or more is a false negative and is dropped: contrastive training would push the query away from a passage
  that answers it. Grade 1 ("on the topic but does not answer") is exactly the hard negative we want.
- The positive is graded the same way. Relabel when the top fused candidate has grade >= `relabel_min_grade` (3),
  a strictly higher grade than the positive and a strictly higher fused score: both signals and the absolute grade
  must agree before a generated pair is changed. The old positive is then dropped, not kept as a negative: it was
  written from and graded for this query, so as a negative it would almost surely be a false negative.
- A candidate whose LLM answer failed (unparseable, off-schema, non-finite log-probability) is not used as a negative:
  without a grade it cannot be ruled out as a false negative, and candidates are plentiful. Failures are counted
  (`dropped.llm_failed`; `dropped.llm_skipped` when the run's LLM budget left the request uncalled); when they
  leave too few negatives the rejection carries the first failed raw answer. A failed grade of the positive disables
  relabelling and the positive check for that query (`positive_llm_failed`).
- `negative_llm_scores` holds each negative's fused RRF score, sum over signals of 1 / (60 + rank) within this query's
  judged passages (positive included), ranks 1-based with ties sharing the best rank. Higher means more relevant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.llm_calls import LLMAnswer, LLMRequest
from prompts import get_prompt

#: Reciprocal rank fusion constant: 60 is the standard value (Cormack et al., 2009), also used by Gecko.
RRF_K = 60
#: The two signals: the relevance grade (prompt `negative_scoring`) and query likelihood (prompt `query_likelihood`).
RELEVANCE = "relevance"
LIKELIHOOD = "likelihood"


@dataclass(frozen=True)
class LLMJudgement:
    """One LLM answer about one (query, passage), reduced to what the fusion needs."""

    pair_id: str
    passage_id: str
    #: "relevance" (grade 0-3) or "likelihood" (log p(query | passage)).
    signal: str
    ok: bool
    value: float | None
    raw: str
    error: str | None = None
    #: Not called because the run's LLM call budget was spent (`LLMAnswer.source == "budget"`).
    skipped: bool = False



def build_llm_requests(
    row: Mapping[str, Any], candidates: Sequence[tuple[str, str]], *, query_likelihood: bool
) -> list[LLMRequest]:
    """Requests for a graded pair's positive and its (passage_id, text) `candidates` (the hardest few): the relevance
    grade of each, and its query likelihood when `query_likelihood`.

    Each request's `context` is (pair_id, passage_id, signal): what `read_judgement` needs to re-join the answer.
    """
    pair_id, query = row["pair_id"], row["query"]
    scored = [(row["passage_id"], row["passage"]), *candidates]
    grading = get_prompt("negative_scoring")
    likelihood = get_prompt("query_likelihood") if query_likelihood else None
    requests = []
    for passage_id, text in scored:
        requests.append(LLMRequest(
            request_id=f"{pair_id}/{passage_id}/{RELEVANCE}",
            prompt_name=grading.name,
            prompt_version=grading.version,
            messages=grading.render(query=query, passage=text),
            output_model=grading.output_model,
            context=(pair_id, passage_id, RELEVANCE),
        ))
        if likelihood is not None:
            requests.append(LLMRequest(
                request_id=f"{pair_id}/{passage_id}/{LIKELIHOOD}",
                prompt_name=likelihood.name,
                prompt_version=likelihood.version,
                messages=likelihood.render(passage=text),
                mode="score",
                continuations=(likelihood.format_answer({"query": query}),),
                context=(pair_id, passage_id, LIKELIHOOD),
            ))
    return requests


def read_judgement(answer: LLMAnswer) -> LLMJudgement:
    pair_id, passage_id, signal = answer.request.context
    value: float | None = None
    ok, error = answer.ok, answer.error
    if ok and answer.value is not None:
        value = float(answer.value["relevance"] if signal == RELEVANCE else answer.value["logprobs"][0])
        if not math.isfinite(value):
            ok, error, value = False, f"non-finite {signal} {value}", None
    elif ok:
        ok, error = False, "answer has no value"
    return LLMJudgement(pair_id, passage_id, signal, ok, value, answer.raw, error, answer.source == "budget")




def fuse_llm_scores(signals: Sequence[Mapping[str, float]], *, rrf_k: int = RRF_K) -> dict[str, float]:
    """Reciprocal rank fusion: sum over signals of 1 / (rrf_k + rank), higher is more relevant.

    Each signal maps passage_id -> score (higher = more relevant) over the same passages. Ranks are 1-based and equal
    scores share the best rank (grades are 0-3, so ties are the rule): equal evidence gets equal credit.
    """
    if not signals:
        return {}
    items = set(signals[0])
    for signal in signals[1:]:
        if set(signal) != items:
            raise ValueError("every signal must score the same passages")
    fused = dict.fromkeys(items, 0.0)
    for signal in signals:
        ordered = sorted(signal.values(), reverse=True)
        best_rank = {}
        for rank, score in enumerate(ordered, start=1):
            best_rank.setdefault(score, rank)
        for passage_id, score in signal.items():
            fused[passage_id] += 1.0 / (rrf_k + best_rank[score])
    return fused


def decide_relabel(
    positive_id: str,
    grades: Mapping[str, int],
    fused: Mapping[str, float],
    teacher_scores: Mapping[str, float],
    *,
    min_grade: int,
) -> str | None:
    """The passage_id that should replace the positive, or None.

    The top fused candidate (ties: higher grade, higher teacher score, passage_id) replaces the positive only when its
    grade is at least `min_grade`, strictly above the positive's, and its fused score is strictly above the positive's.
    No grade for the positive (failed answer) means no relabel.
    """
    if positive_id not in grades:
        return None
    others = [passage_id for passage_id in grades if passage_id != positive_id]
    if not others:
        return None
    best = min(others, key=lambda pid: (-fused[pid], -grades[pid], -teacher_scores.get(pid, 0.0), pid))
    clearly_better = (
        grades[best] >= min_grade and grades[best] > grades[positive_id] and fused[best] > fused[positive_id]
    )
    return best if clearly_better else None

