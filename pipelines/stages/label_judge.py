"""The label judge of GenerateCounterfactuals: does a generated text belong to the label it was written for?

A counterfactual that keeps its seed's meaning under a new label, or a new example that reads as another label, passes
every surface check (unchanged, not_minimal, duplicate, ...) and would teach the student a wrong label. The judge
reads each text that survived those checks and rejects it, reason `label_mismatch`, when it does not assign the text
to its target label. `GenerateCounterfactualsConfig.judge` picks the judge:

- "teacher" (default): the run's teacher embeds the text and every label's prototype; the text must be nearest its
  target label (`teacher_verdict`). Offline, the teacher is the judge that works: the 135M local LLM judges at chance
  (the same finding that keeps offline grading on the teacher's round trip).
- "llm": the LLM is asked which label fits the text (prompts/label_judgment: the label's number, constrained to the
  listed numbers), through `CallLLM`, so the judgment is cached and drawn from the run's budget like every LLM call.
  For a capable model (Gemini, or a bigger local model on a GPU).
- "both": the teacher, then the LLM on the texts the teacher kept (so the LLM is asked only where it can still
  reject); a text is kept only if both assign it to its label.
- "off": no judge; every surviving text is kept.

The teacher's rule. Each label's prototype is the mean of two unit vectors: the label's description and the centroid of
its seed examples (`label_prototypes`). The description says what the label means, the seeds how its texts read;
weighing the two equally keeps a label with many seeds from drowning its definition and a label with one seed from
resting on that one text. The text is kept when its cosine similarity to the target's prototype is at least the best
label's minus `judge_margin` (default 0: the target must be the teacher's best label, ties kept), because a wrong
label costs the student more than a lost example costs the stage. A counterfactual is judged without its own seed in
the prototypes (leave-one-out): an edit shares most of its seed's words, and with the seed in the original label's
centroid the teacher would see that shared surface, not the edit's meaning, and reject good edits.

Every text, description and seed is embedded with task type CLASSIFICATION, not RETRIEVAL_QUERY: the comparison is
symmetric (a text against texts and definitions, both sides embedded alike), not a query against documents that answer
it, and CLASSIFICATION is the task type Gemini and EmbeddingGemma-style prompted models offer for sorting texts into
classes (a model without prompts, like all-mpnet-base-v2, embeds the bare text either way). The embeddings go through
`EmbedTeacher`, so descriptions, seeds and texts are served from the content-addressed embedding cache on a re-run,
identical texts are embedded once, and a priced teacher draws on the run's cost budget after the stage's own LLM calls
(and before the LLM judge's). Their usage is reported as the embedding stage `TEACHER_USAGE` in the manifest, apart
from the stage's LLM usage, so the two costs are not counted twice.

Outcomes, each judged text exactly one: kept; rejected `label_mismatch` (the judge assigned another label; `detail`
names it, the LLM judge's raw answer is kept); `judge_failed` (the judge gave no verdict: the text's or a label's
teacher embedding failed, or the LLM's answer stayed invalid); `skipped_by_budget` (the run's budget left the text's
judgment, or a label's prototype, uncomputed; a later run with a larger budget judges it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines.accounting import sum_tallies
from pipelines.budget import BUDGET_REASON
from pipelines.clients.base import GenerationConfig, TaskType
from pipelines.llm_calls import CallLLM, LLMAnswer, LLMRequest, failure_reason
from pipelines.model_access import ModelAccess
from pipelines.sharded_search import vector_array
from pipelines.stages import rejected_row
from pipelines.stages.embed_teacher import EmbedTeacher, EmbedTeacherConfig
from pipelines.stages.task_spec import TaskSpec, TaskSpecError
from prompts import get_prompt
from prompts.label_judgment import MAX_LABELS, choice_model, format_labels

JUDGES = ("teacher", "llm", "both", "off")
LABEL_MISMATCH = "label_mismatch"
JUDGE_FAILED = "judge_failed"
JUDGE_PROMPT = "label_judgment"
TASK_TYPE = TaskType.CLASSIFICATION
#: The manifest's `embedding_usage` row of the judge's teacher embeddings.
TEACHER_USAGE = "generate_counterfactuals.label_judge"
#: Output tokens of one judgment: {"label":12} is about 6 tokens; the rest is room for a model's spacing.
JUDGE_OUTPUT_TOKENS = 32

#: Id prefixes of the texts the teacher embeds, so label, seed and candidate ids can never collide.
_LABEL, _SEED, _CANDIDATE = "label/", "seed/", "candidate/"


def uses_teacher(judge: str) -> bool:
    return judge in ("teacher", "both")


def uses_llm(judge: str) -> bool:
    return judge in ("llm", "both")


# --- The teacher's rule (pure) ----------------------------------------------------------------------------------------


def _unit(vector: np.ndarray) -> np.ndarray:
    # A zero vector stays zero instead of turning into NaN.
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def prototype_texts(spec: TaskSpec) -> list[dict[str, str]]:
    """What the teacher embeds to know the labels, as EmbedTeacher items: each label's description and each seed."""
    items = [{"id": _LABEL + label.name, "text": label.description, "task_type": TASK_TYPE.value}
             for label in spec.labels]
    items += [{"id": _SEED + seed.seed_id, "text": seed.text, "task_type": TASK_TYPE.value} for seed in spec.seeds]
    return items


def label_prototypes(
    labels: Sequence[str],
    description_vectors: Mapping[str, Sequence[float]],
    seed_vectors: Mapping[str, Sequence[tuple[str, Sequence[float]]]],
    exclude_seed: str | None = None,
) -> dict[str, np.ndarray]:
    """Label -> unit prototype: the mean of the unit description vector and the unit centroid of the label's unit seed
    vectors, leaving out `exclude_seed` (see the module docstring). A label with only one of the two uses it alone; a
    label with neither (its embeddings failed) has no prototype."""
    prototypes = {}
    for label in labels:
        parts = []
        if label in description_vectors:
            parts.append(_unit(vector_array(description_vectors[label]).astype(np.float64)))
        seeds = [_unit(vector_array(vector).astype(np.float64))
                 for seed_id, vector in seed_vectors.get(label, ()) if seed_id != exclude_seed]
        if seeds:
            parts.append(_unit(np.mean(seeds, axis=0)))
        if parts:
            prototypes[label] = _unit(np.sum(parts, axis=0))
    return prototypes


def teacher_scores(vector: Sequence[float], prototypes: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Label -> cosine similarity of `vector` to the label's prototype."""
    unit = _unit(vector_array(vector).astype(np.float64))
    return {label: float(unit @ prototype) for label, prototype in prototypes.items()}


def teacher_verdict(scores: Mapping[str, float], target: str, margin: float = 0.0) -> tuple[bool, str]:
    """(keep, best label): keep when the target's score is at least the best score minus `margin`."""
    best = max(scores, key=lambda label: (scores[label], label == target))
    return target in scores and scores[target] >= scores[best] - margin, best


# --- The LLM's judgment (pure) ----------------------------------------------------------------------------------------


def judge_request(candidate: Mapping[str, Any], spec: TaskSpec) -> LLMRequest:
    """The LLM request asking which of the task's labels fits the candidate's text; the candidate rides in the
    context. The labels are listed in the task spec's order, so the same text asks the same request (and hits the
    cache) in every run, whatever label it was written for."""
    prompt = get_prompt(JUDGE_PROMPT)
    row = candidate["row"]
    labels = format_labels([(label.name, label.description) for label in spec.labels])
    return LLMRequest(
        request_id=f"judge/{row['example_id']}",
        prompt_name=prompt.name,
        prompt_version=prompt.version,
        messages=prompt.render(task_description=spec.description, labels=labels, text=row["text"]),
        output_model=choice_model(len(spec.labels)),
        config=GenerationConfig(temperature=0.0, max_output_tokens=JUDGE_OUTPUT_TOKENS),
        context=candidate,
    )


def llm_verdict(answer: LLMAnswer, spec: TaskSpec) -> tuple[str | None, str | None]:
    """(None, None) when the LLM chose the candidate's own label, else (reason, detail) of its rejection."""
    target = answer.request.context["row"]["label"]
    if not answer.ok or answer.value is None:
        reason = failure_reason(answer, JUDGE_FAILED)
        return reason, f"the LLM judge gave no valid answer ({answer.error})"
    chosen = spec.label_names[answer.value["label"] - 1]
    if chosen == target:
        return None, None
    return LABEL_MISMATCH, f"the LLM judge chose {chosen!r} (label {answer.value['label']}), not {target!r}"


# --- Beam -------------------------------------------------------------------------------------------------------------

REJECTED = "rejected"


def _vector_outcomes(embedded) -> beam.PCollection:
    """(id, vector or None, rejection reason or None) for every text the teacher was given."""
    return (
        embedded["kept"] | "Vectors" >> beam.Map(lambda item: (item["id"], item["embedding"], None)),
        embedded["rejected"] | "Unembedded" >> beam.Map(lambda row: (row["record_id"], None, row["reason"])),
    ) | "VectorOutcomes" >> beam.Flatten()


class _TeacherFn(beam.DoFn):
    """(example_id, {"candidates": [{"row", "raw"}], "vectors": [(vector, reason)]}) + the prototype texts' outcomes
    -> the candidate (main output) or its REJECTED row."""

    def __init__(self, spec: TaskSpec, margin: float, stage: str):
        self._spec = spec
        self._margin = margin
        self._stage = stage
        self._source: list | None = None
        self._descriptions: dict[str, list[float]] = {}
        self._seeds: dict[str, list[tuple[str, list[float]]]] = {}
        #: Label -> why some of its texts have no vector (the budget wins: a larger budget fixes it).
        self._missing: dict[str, str] = {}

    def _index(self, prototype_outcomes: list) -> None:
        """Descriptions and seeds by label, once per side input (a worker sees the same list for every element)."""
        if prototype_outcomes is self._source:
            return
        label_of = {seed.seed_id: seed.label for seed in self._spec.seeds}
        self._descriptions, self._seeds, self._missing = {}, {}, {}
        for text_id, vector, reason in prototype_outcomes:
            if text_id.startswith(_LABEL):
                label, seed_id = text_id[len(_LABEL):], None
            else:
                seed_id = text_id[len(_SEED):]
                label = label_of[seed_id]
            if vector is None:
                if self._missing.get(label) != BUDGET_REASON:
                    self._missing[label] = reason
            elif seed_id is None:
                self._descriptions[label] = vector
            else:
                self._seeds.setdefault(label, []).append((seed_id, vector))
        self._source = prototype_outcomes

    def _reject(self, candidate, reason: str, detail: str):
        row = candidate["row"]
        return beam.pvalue.TaggedOutput(REJECTED, rejected_row(
            self._stage, reason, row, record_id=row["example_id"], raw_answer=candidate["raw"], detail=detail))

    def process(self, element, prototype_outcomes: list):
        self._index(prototype_outcomes)
        _, grouped = element
        vectors = list(grouped["vectors"])
        for candidate in grouped["candidates"]:
            row = candidate["row"]
            vector, reason = vectors[0] if vectors else (None, JUDGE_FAILED)
            if vector is None:
                why = "the run's budget is spent" if reason == BUDGET_REASON else "its embedding failed"
                yield self._reject(candidate, BUDGET_REASON if reason == BUDGET_REASON else JUDGE_FAILED,
                                   f"the teacher could not judge the text: {why}")
                continue
            prototypes = label_prototypes(self._spec.label_names, self._descriptions, self._seeds,
                                          exclude_seed=row["counterfactual_of"])
            unjudged = [label for label in self._spec.label_names if label not in prototypes]
            if unjudged:
                # Without every label's prototype the text might belong to the missing one: no verdict.
                budget = any(self._missing.get(label) == BUDGET_REASON for label in unjudged)
                yield self._reject(candidate, BUDGET_REASON if budget else JUDGE_FAILED,
                                   f"the teacher has no vector for label {unjudged[0]!r} (its description and seeds "
                                   f"were {'not embedded: the budget is spent' if budget else 'not embedded'})")
                continue
            scores = teacher_scores(vector, prototypes)
            keep, best = teacher_verdict(scores, row["label"], self._margin)
            if keep:
                yield candidate
            else:
                yield self._reject(candidate, LABEL_MISMATCH, (
                    f"the teacher places the text nearest {best!r} ({scores[best]:.3f}), not its label "
                    f"{row['label']!r} ({scores[row['label']]:.3f}; judge_margin {self._margin:g})"))


class _LLMVerdictFn(beam.DoFn):
    def __init__(self, spec: TaskSpec, stage: str):
        self._spec = spec
        self._stage = stage

    def process(self, answer: LLMAnswer):
        candidate = answer.request.context
        reason, detail = llm_verdict(answer, self._spec)
        if reason is None:
            yield candidate
            return
        row = candidate["row"]
        yield beam.pvalue.TaggedOutput(REJECTED, rejected_row(
            self._stage, reason, row, record_id=row["example_id"], raw_answer=answer.raw, detail=detail))


class JudgeLabels(beam.PTransform):
    """Candidates `{"row": CLASSIFICATION_EXAMPLE row, "raw": the generating LLM answer}` -> {"kept": candidates,
    "rejected": REJECTED rows of `stage`, "answers": the LLM judge's LLMAnswers (empty without it),
    "tallies": the judges' usage (the teacher's embeddings, the LLM's calls), summed}.

    Exactly one outcome per candidate. Built while the pipeline is built, so an impossible judge fails before any work.
    """

    def __init__(self, spec: TaskSpec, *, stage: str, judge: str = "teacher", margin: float = 0.0,
                 llm: ModelAccess | None = None, teacher: ModelAccess | None = None,
                 embed: EmbedTeacherConfig | None = None):
        super().__init__()
        if judge not in JUDGES:
            raise ValueError(f"judge must be one of {', '.join(JUDGES)}, got {judge!r}")
        if uses_teacher(judge) and teacher is None:
            raise ValueError(f"judge {judge!r} needs the run's teacher (an embedder's ModelAccess)")
        if uses_llm(judge):
            if llm is None:
                raise ValueError(f"judge {judge!r} needs an LLM's ModelAccess")
            if len(spec.labels) > MAX_LABELS:
                raise TaskSpecError(f"{spec.source}: {len(spec.labels)} labels, more than the {MAX_LABELS} the LLM "
                                    f"judge lists in one prompt; set generate.counterfactuals.judge = \"teacher\"")
        self._spec = spec
        self._stage = stage
        self._judge = judge
        self._margin = margin
        self._llm = llm
        self._teacher = teacher
        self._embed = embed or EmbedTeacherConfig()

    def expand(self, candidates):
        pipeline = candidates.pipeline
        rejected, answers, tallies = [], [], []
        if uses_teacher(self._judge):
            judged = self._teacher_judge(candidates, tallies)
            candidates = judged["kept"]
            rejected.append(judged[REJECTED])
        if uses_llm(self._judge):
            called = (
                candidates
                | "JudgeRequests" >> beam.Map(judge_request, self._spec)
                | "CallJudgeLLM" >> CallLLM(self._llm, self._stage)
            )
            judged = called["answers"] | "LLMVerdicts" >> beam.ParDo(
                _LLMVerdictFn(self._spec, self._stage)).with_outputs(REJECTED, main="kept")
            candidates = judged["kept"]
            rejected.append(judged[REJECTED])
            answers.append(called["answers"])
            tallies.append(called["tallies"])

        def gathered(parts, label):
            return tuple(parts) | label >> beam.Flatten() if parts else pipeline | label >> beam.Create([])

        return {"kept": candidates, "rejected": gathered(rejected, "JudgeRejected"),
                "answers": gathered(answers, "JudgeAnswers"),
                "tallies": sum_tallies(tallies, "JudgeTallies") if tallies else gathered(tallies, "JudgeTallies")}

    def _teacher_judge(self, candidates, tallies: list):
        texts = (
            candidates.pipeline | "PrototypeTexts" >> beam.Create(prototype_texts(self._spec)),
            candidates | "CandidateTexts" >> beam.Map(
                lambda candidate: {"id": _CANDIDATE + candidate["row"]["example_id"],
                                   "text": candidate["row"]["text"], "task_type": TASK_TYPE.value}),
        ) | "TeacherTexts" >> beam.Flatten()
        embedded = texts | "TeacherEmbeddings" >> EmbedTeacher(self._teacher, self._embed, stage=TEACHER_USAGE)
        # The teacher's usage only: the texts it embeds are the judge's, not rows of the stage, and each candidate's
        # outcome is counted once, by the verdict.
        tallies.append(embedded["tallies"] | "TeacherUsage" >> beam.Filter(
            lambda tally: tally[0][0] not in ("stage", "reason")))
        outcomes = _vector_outcomes(embedded)
        prototype_outcomes = outcomes | "PrototypeVectors" >> beam.Filter(
            lambda item: not item[0].startswith(_CANDIDATE))
        candidate_vectors = (
            outcomes
            | "CandidateVectors" >> beam.Filter(lambda item: item[0].startswith(_CANDIDATE))
            | "KeyVectors" >> beam.Map(lambda item: (item[0][len(_CANDIDATE):], (item[1], item[2])))
        )
        keyed = candidates | "KeyCandidates" >> beam.Map(lambda candidate: (candidate["row"]["example_id"], candidate))
        return (
            {"candidates": keyed, "vectors": candidate_vectors}
            | "JoinVectors" >> beam.CoGroupByKey()
            | "TeacherVerdicts" >> beam.ParDo(
                _TeacherFn(self._spec, self._margin, self._stage),
                beam.pvalue.AsList(prototype_outcomes)).with_outputs(REJECTED, main="kept")
        )
