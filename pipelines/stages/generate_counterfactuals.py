"""Stage 6, GenerateCounterfactuals (Gemini Embedding): classification data from a task spec and a few seed examples.

Input: a task spec file (YAML or JSON, read through Beam filesystems, so `gs://` works; format and checks in
pipelines/stages/task_spec.py), loaded when the pipeline is built so a broken spec stops the run before any work.
Output: `{"kept": CLASSIFICATION_EXAMPLE rows, "rejected": REJECTED rows, "tallies": manifest tallies (the stage's
rows and rejections, its LLM usage and the label judge's), "answers": LLMAnswer (generation and LLM judge)}`.

Three kinds of kept rows (`origin`):
- "seed": the spec's own labelled examples (when `include_seed_examples`).
- "generated": new examples the LLM writes for one label, shown a few seeds of that label (`example_generation`).
- "counterfactual": a seed minimally edited so that it belongs to another label (`counterfactual_generation`); it keeps
  `counterfactual_of` (the seed's example_id) and `original_label`. Pairs that differ in a few words but not in label
  are what teaches an embedding model what a label depends on.

Every generated example and counterfactual that passes the surface checks below then faces a second judge of its
label (`judge`: the run's teacher by default, or the LLM, both, or off; pipelines/stages/label_judge.py): a text the
judge does not assign to its target label is rejected as `label_mismatch`. The surface checks cannot see an edit that
kept its seed's meaning under a new label; the student would learn that wrong label.

Rejects (reason codes). Seed rows: `malformed_row` (unparseable JSONL line, CSV row with the wrong number of columns,
a non-string field), `empty_text`, `missing_label`, `unknown_label`, `duplicate_seed` (same normalized text as an
earlier seed). LLM output: `llm_failed` (no valid answer; raw answer kept), `skipped_by_budget` (never called or never
judged: the run's budget was spent), `surplus` (an answer listed more examples than asked), `empty_text` (no words left
after normalization), `unchanged` (a counterfactual identical to its seed),
`copies_example` (repeats a text the prompt showed as a few-shot example), `duplicate` (repeats a seed or an earlier
generated example), `conflicting_labels` (the same text generated for two different labels: all copies go, since the
text cannot be trusted for either), `not_minimal` (a counterfactual that rewrote most of the seed), `label_mismatch`
(the label judge assigns the text to another label), `judge_failed` (the label judge gave no verdict).

Accounting. The stage's units are the seed rows it read (valid or not) plus its LLM requests (one per label and
chunk of `examples_per_request` new examples, one per seed and target label for counterfactuals), so
`input = seed rows read + requests`. A seed row ends as kept, rejected or, when `include_seed_examples` is off,
`skipped`. A request's answer ends as one rejected row (`llm_failed`) or as one row per text it listed, each kept or
rejected; the rows beyond the first of an answer are reported as `expanded`. The label judge takes one row and gives
back one outcome, so it adds no unit. So the manifest's balance holds: `input + expanded = kept + rejected +
skipped`. The "tallies" output carries input, expanded and skipped, counted where the rows come into being, and
kept and every rejection's reason, counted as the rows leave the stage (pipelines/accounting.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import apache_beam as beam
import numpy as np

from pipelines.accounting import TALLIES, CountingDoFn, CountRows, sum_tallies
from pipelines.clients.base import GenerationConfig
from pipelines.llm_calls import CallLLM, LLMAnswer, LLMRequest, failure_reason
from pipelines.model_access import ModelAccess
from pipelines.stages import rejected_row
from pipelines.stages.embed_teacher import EmbedTeacherConfig
from pipelines.stages.label_judge import JUDGES, JudgeLabels
from pipelines.stages.task_spec import SeedExample, TaskSpec, example_id, load_task_spec
from pipelines.text_matching import copies_example, edit_ratio, stable_hash, text_key
from prompts import PromptSpec, get_prompt
from prompts.example_generation import MAX_EXAMPLES

STAGE = "generate_counterfactuals"
EXAMPLES_PROMPT = "example_generation"
COUNTERFACTUAL_PROMPT = "counterfactual_generation"
#: Among copies of one text, the origin listed first is kept: a counterfactual is worth more than a new example
#: because it comes paired with its seed.
ORIGINS = ("seed", "counterfactual", "generated")

# --- Configuration and plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateCounterfactualsConfig:
    #: The task spec file (YAML or JSON; local path or gs://). Required.
    task_spec: str = ""
    #: New examples per label (0: none). A target, not a promise: rejected examples are not replaced.
    examples_per_label: int = 8
    #: New examples asked for in one request; a label needing more gets several requests, each shown other seeds.
    examples_per_request: int = 8
    #: Label-flipping edits per seed, each toward a different target label (at most the number of other labels).
    counterfactuals_per_seed: int = 1
    #: Seeds per label that get counterfactuals (None: all): caps the cost at about
    #: labels x max_seeds_per_label x counterfactuals_per_seed calls however large the seed file is.
    max_seeds_per_label: int | None = 16
    #: Seeds of the label shown in each example-generation prompt: enough to convey style and length, few enough
    #: that the model is not tempted to paraphrase them.
    seeds_per_prompt: int = 3
    #: Also emit the seed rows themselves (origin "seed"); off, they are counted as skipped.
    include_seed_examples: bool = True
    #: A counterfactual whose word-level edit distance to its seed exceeds this share of the longer text is a rewrite,
    #: not a minimal edit. 0.6: the prompt's own demonstration changes 6 of 14 words (0.43) and is the most an edit
    #: should need; above 0.6 most words changed and the pair no longer isolates what decides the label.
    max_edit_ratio: float = 0.6
    #: Sampling temperature for new examples (each request gets its own sampling seed, so chunks of one label differ).
    #: Counterfactuals always use 0: a minimal edit has one best answer.
    temperature: float = 0.7
    #: Output tokens allowed per requested text: room for a paragraph plus JSON quoting. A cut-off answer fails to
    #: parse and is lost as llm_failed, while unused allowance costs nothing, so it errs on the generous side.
    max_output_tokens_per_example: int = 192
    #: Run seed for every deterministic choice (few-shot seeds, capped seeds, sampling seeds).
    seed: int = 0
    #: Who checks that each generated example and counterfactual belongs to its target label (else `label_mismatch`):
    #: "teacher" (the run's teacher: nearest label prototype), "llm" (asks the LLM which label fits; needs a capable
    #: model: the 135M local LLM judges at chance), "both" (teacher, then LLM) or "off". See label_judge.py.
    judge: Literal["teacher", "llm", "both", "off"] = "teacher"
    #: Teacher judge: a text is kept when its similarity to its target label is at least the best label's minus this.
    #: 0: the target must be the teacher's best label. A wrong label costs the student more than a lost example costs
    #: the stage; raise it (e.g. 0.02) only to keep near-ties a weak teacher cannot tell apart.
    judge_margin: float = 0.0

    def __post_init__(self) -> None:
        if not self.task_spec:
            raise ValueError("task_spec: the path of the task spec file is required")
        for name in ("examples_per_label", "counterfactuals_per_seed", "seeds_per_prompt"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.examples_per_request <= MAX_EXAMPLES:
            raise ValueError(f"examples_per_request must be in 1..{MAX_EXAMPLES} (the example_generation prompt's "
                             f"limit), got {self.examples_per_request}")
        if self.max_seeds_per_label is not None and self.max_seeds_per_label < 0:
            raise ValueError(f"max_seeds_per_label must be >= 0 or null, got {self.max_seeds_per_label}")
        if not 0 < self.max_edit_ratio <= 1:
            raise ValueError(f"max_edit_ratio must be in (0, 1], got {self.max_edit_ratio}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_output_tokens_per_example < 1:
            raise ValueError(f"max_output_tokens_per_example must be >= 1, got {self.max_output_tokens_per_example}")
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {', '.join(JUDGES)}, got {self.judge!r}")
        if not 0 <= self.judge_margin <= 2:
            raise ValueError(f"judge_margin must be in [0, 2] (a difference of cosine similarities), "
                             f"got {self.judge_margin}")


@dataclass(frozen=True)
class GenerationUnit:
    """One LLM request of the plan: new examples for a label, or one counterfactual of one seed."""

    kind: Literal["generated", "counterfactual"]
    #: The label to write examples of ("generated") or the seed's own label ("counterfactual").
    label: str
    #: Request number within the label ("generated") or counterfactual slot of the seed ("counterfactual").
    index: int
    #: Examples asked for (always 1 for a counterfactual).
    count: int = 1
    seed_id: str | None = None
    target: str | None = None

    @property
    def request_id(self) -> str:
        if self.kind == "generated":
            return f"generated/{self.label}/{self.index}"
        return f"counterfactual/{self.seed_id}/{self.target}"


def counterfactual_seeds(spec: TaskSpec, config: GenerateCounterfactualsConfig) -> dict[str, list[SeedExample]]:
    """Label -> the seeds that get counterfactuals, at most `max_seeds_per_label`, in a run-seeded order.

    Ranking by a hash of (run seed, seed id) is a random sample that stays put when seeds are added: a new seed
    displaces at most one chosen seed, so a grown seed file re-uses almost every cached answer.
    """
    chosen = {}
    for label in spec.label_names:
        ranked = sorted(spec.seeds_of(label), key=lambda seed: stable_hash(config.seed, seed.seed_id))
        chosen[label] = ranked if config.max_seeds_per_label is None else ranked[: config.max_seeds_per_label]
    return chosen


def target_labels(spec: TaskSpec, seed: SeedExample, config: GenerateCounterfactualsConfig) -> tuple[str, ...]:
    """Target labels for a seed's counterfactuals: the other labels in spec order, rotated by a hashed offset.

    The offset comes from (run seed, seed id), so a label's counterfactuals spread evenly over the other labels in
    expectation (each label pair gets its contrast examples) and a seed keeps its targets, and its cached answers,
    when other seeds are added. "Most confusable" targets would need embeddings this stage does not have and would
    skew the label mix. Each target at most once per seed: two edits toward one label would be near-duplicates.
    """
    others = [name for name in spec.label_names if name != seed.label]
    offset = stable_hash(config.seed, seed.seed_id, "target") % len(others)
    count = min(config.counterfactuals_per_seed, len(others))
    return tuple(others[(offset + slot) % len(others)] for slot in range(count))


def plan_units(spec: TaskSpec, config: GenerateCounterfactualsConfig) -> list[GenerationUnit]:
    """Every LLM request of the stage, in a deterministic order: example chunks per label, then counterfactuals."""
    units = []
    for label in spec.label_names:
        remaining, index = config.examples_per_label, 0
        while remaining > 0:
            count = min(remaining, config.examples_per_request)
            units.append(GenerationUnit("generated", label, index, count))
            remaining -= count
            index += 1
    for label, seeds in counterfactual_seeds(spec, config).items():
        for seed in seeds:
            for slot, target in enumerate(target_labels(spec, seed, config)):
                units.append(GenerationUnit("counterfactual", label, slot, 1, seed.seed_id, target))
    return units


def few_shot_seeds(spec: TaskSpec, unit: GenerationUnit, config: GenerateCounterfactualsConfig) -> tuple[str, ...]:
    """The seed texts shown when asking for new examples: a sample of the label's seeds, different per request."""
    pool = spec.seeds_of(unit.label)
    size = min(config.seeds_per_prompt, len(pool))
    rng = np.random.default_rng(stable_hash(config.seed, spec.name, unit.request_id))
    return tuple(pool[index].text for index in sorted(rng.choice(len(pool), size=size, replace=False)))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def demonstration_texts(prompt: PromptSpec, fields: Mapping[str, Any]) -> tuple[str, ...]:
    """Every data text the prompt's own few-shot demonstrations show for `fields`: their inputs and their answers."""
    texts: list[str] = []
    for example in prompt.select_examples(**fields):
        texts += [text for name, value in example.inputs if name in prompt.data_fields for text in _strings(value)]
        texts += list(_strings(json.loads(example.answer)))
    return tuple(texts)


def build_request(unit: GenerationUnit, spec: TaskSpec, config: GenerateCounterfactualsConfig) -> LLMRequest:
    """The LLM request for one unit; its context carries the unit, the seed and every text the prompt showed."""
    if unit.kind == "generated":
        prompt = get_prompt(EXAMPLES_PROMPT)
        label = spec.label(unit.label)
        shown = few_shot_seeds(spec, unit, config)
        fields: dict[str, Any] = {"task_description": spec.description, "label": label.name,
                                  "label_description": label.description, "seed_examples": shown,
                                  "count": unit.count}
        sampling_seed = stable_hash(config.seed, unit.request_id) % 2**31 if config.temperature > 0 else None
        generation = GenerationConfig(temperature=config.temperature, seed=sampling_seed,
                                      max_output_tokens=unit.count * config.max_output_tokens_per_example)
        seed = None
    else:
        prompt = get_prompt(COUNTERFACTUAL_PROMPT)
        seed = next(candidate for candidate in spec.seeds if candidate.seed_id == unit.seed_id)
        source, target = spec.label(seed.label), spec.label(unit.target or "")
        fields = {"task_description": spec.description, "text": seed.text, "label": source.name,
                  "label_description": source.description, "target_label": target.name,
                  "target_label_description": target.description}
        shown = ()
        generation = GenerationConfig(temperature=0.0, max_output_tokens=config.max_output_tokens_per_example)
    return LLMRequest(
        request_id=unit.request_id,
        prompt_name=prompt.name,
        prompt_version=prompt.version,
        messages=prompt.render(**fields),
        output_model=prompt.output_model,
        config=generation,
        context={"unit": unit, "seed": seed, "shown": (*shown, *demonstration_texts(prompt, fields))},
    )


# --- Judging answers (pure) -------------------------------------------------------------------------------------------


def classification_row(
    spec: TaskSpec,
    *,
    row_id: str,
    text: str,
    label: str,
    origin: str,
    counterfactual_of: str | None = None,
    original_label: str | None = None,
    llm_model: str | None = None,
    prompt_version: str | None = None,
) -> dict[str, Any]:
    """A CLASSIFICATION_EXAMPLE row. For a counterfactual the original label leads the negatives: it is the one the
    text was a minimal edit away from, the hardest negative there is."""
    others = [name for name in spec.label_names if name != label]
    if original_label in others:
        others.remove(original_label)
        others.insert(0, original_label)
    return {
        "example_id": row_id,
        "task_name": spec.name,
        "text": text,
        "label": label,
        "label_description": spec.label(label).description,
        "negative_labels": others,
        "origin": origin,
        "counterfactual_of": counterfactual_of,
        "original_label": original_label,
        "llm_model": llm_model,
        "prompt_version": prompt_version,
    }


def seed_text_index(spec: TaskSpec) -> dict[str, SeedExample]:
    """text_key -> seed, for the duplicate-of-a-seed check."""
    return {text_key(seed.text): seed for seed in spec.seeds}


def seed_outcomes(spec: TaskSpec, config: GenerateCounterfactualsConfig) -> list[tuple[str, dict[str, Any] | None]]:
    """("kept", row), ("skipped", None) or ("rejected", REJECTED row) for every seed row the spec read."""
    outcomes: list[tuple[str, dict[str, Any] | None]] = []
    for seed in spec.seeds:
        if config.include_seed_examples:
            outcomes.append(("kept", classification_row(spec, row_id=seed.seed_id, text=seed.text, label=seed.label,
                                                        origin="seed")))
        else:
            outcomes.append(("skipped", None))
    for bad in spec.rejected_seeds:
        outcomes.append(("rejected", rejected_row(STAGE, bad.reason, bad.payload, record_id=bad.location,
                                                  detail=bad.detail)))
    return outcomes


def judge_answer(
    answer: LLMAnswer,
    spec: TaskSpec,
    config: GenerateCounterfactualsConfig,
    llm_model: str,
    seeds_by_text: Mapping[str, SeedExample],
) -> list[tuple[str, dict[str, Any]]]:
    """One answer -> ("candidate", {"row", "raw"}) per text that passed, ("rejected", REJECTED row) per other outcome.

    A failed answer gives exactly one rejected row; a good one gives one outcome per text it lists. Candidates still
    face the run-wide duplicate check (`resolve_duplicates`).
    """
    unit: GenerationUnit = answer.request.context["unit"]
    request_id = answer.request.request_id
    if not answer.ok or answer.value is None:
        payload = {"request_id": request_id, "kind": unit.kind, "label": unit.label, "count": unit.count,
                   "seed_id": unit.seed_id, "target_label": unit.target}
        reason = failure_reason(answer, "llm_failed")
        return [("rejected", rejected_row(STAGE, reason, payload, record_id=request_id, raw_answer=answer.raw,
                                          detail=answer.error))]
    prompt_version = f"{answer.request.prompt_name}@{answer.request.prompt_version}"
    shown = answer.request.context["shown"]
    seed: SeedExample | None = answer.request.context["seed"]
    if unit.kind == "generated":
        texts = list(answer.value["examples"])
    else:
        texts = [answer.value["text"]]
    outcomes: list[tuple[str, dict[str, Any]]] = []
    for index, text in enumerate(texts):
        if seed is None:
            row = classification_row(spec, row_id=example_id(spec.name, "generated", request_id, index), text=text,
                                     label=unit.label, origin="generated", llm_model=llm_model,
                                     prompt_version=prompt_version)
        else:
            row = classification_row(spec, row_id=example_id(spec.name, "counterfactual", seed.seed_id, unit.target),
                                     text=text, label=unit.target or "", origin="counterfactual",
                                     counterfactual_of=seed.seed_id, original_label=seed.label, llm_model=llm_model,
                                     prompt_version=prompt_version)
        key = text_key(text)
        reason, detail = None, None
        if index >= unit.count:
            reason, detail = "surplus", f"text {index + 1} of an answer that was asked for {unit.count}"
        elif not key:
            reason, detail = "empty_text", "the text has no words"
        elif seed is not None and key == text_key(seed.text):
            reason, detail = "unchanged", "the counterfactual is the seed text itself"
        elif copies_example(text, shown):
            reason, detail = "copies_example", "the text repeats an example the prompt showed"
        elif key in seeds_by_text:
            twin = seeds_by_text[key]
            reason = "duplicate"
            detail = f"the text repeats seed {twin.seed_id} ({twin.location}, label {twin.label!r})"
        elif seed is not None:
            ratio = edit_ratio(seed.text, text)
            if ratio > config.max_edit_ratio:
                reason, detail = "not_minimal", (f"word edit ratio {ratio:.2f} to seed {seed.seed_id} is above "
                                                 f"max_edit_ratio {config.max_edit_ratio}")
        if reason is None:
            outcomes.append(("candidate", {"row": row, "raw": answer.raw}))
        else:
            outcomes.append(("rejected", rejected_row(STAGE, reason, row, record_id=row["example_id"],
                                                      raw_answer=answer.raw, detail=detail)))
    return outcomes


def resolve_duplicates(candidates: Iterable[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Candidates sharing one text_key -> ("kept", row) for one of them and ("rejected", row) for the others.

    The kept copy is the first by (origin in ORIGINS order, example_id), so the choice does not depend on arrival
    order. Copies carrying different labels are all rejected: the text is ambiguous for this task.
    """
    ordered = sorted(candidates, key=lambda item: (ORIGINS.index(item["row"]["origin"]), item["row"]["example_id"]))
    labels = sorted({item["row"]["label"] for item in ordered})
    outcomes: list[tuple[str, dict[str, Any]]] = []
    for position, item in enumerate(ordered):
        row = item["row"]
        if len(labels) > 1:
            outcomes.append(("rejected", rejected_row(
                STAGE, "conflicting_labels", row, record_id=row["example_id"], raw_answer=item["raw"],
                detail=f"the same text was generated for labels {', '.join(repr(label) for label in labels)}")))
        elif position == 0:
            outcomes.append(("kept", row))
        else:
            outcomes.append(("rejected", rejected_row(
                STAGE, "duplicate", row, record_id=row["example_id"], raw_answer=item["raw"],
                detail=f"the same text as {ordered[0]['row']['example_id']} ({ordered[0]['row']['origin']})")))
    return outcomes


# --- Beam ------------------------------------------------------------------------------------------------------------

REJECTED = "rejected"


class _SeedFn(CountingDoFn):
    """A seed row's outcome -> the row, kept or rejected; each is one input row (the stage's rows come into being
    here), and a seed left out (`include_seed_examples` off) is counted as skipped."""

    def __init__(self):
        super().__init__(STAGE)

    def process(self, outcome: tuple[str, dict[str, Any] | None]):
        kind, row = outcome
        self.tally.count("input")
        if kind == "kept":
            yield row
        elif kind == "skipped":
            self.tally.count("skipped")
        else:
            assert row is not None
            yield beam.pvalue.TaggedOutput(REJECTED, row)


class _JudgeFn(CountingDoFn):
    def __init__(self, spec: TaskSpec, config: GenerateCounterfactualsConfig, llm_model: str):
        super().__init__(STAGE)
        self._spec = spec
        self._config = config
        self._llm_model = llm_model
        self._seeds_by_text: dict[str, SeedExample] = {}

    def setup(self) -> None:
        self._seeds_by_text = seed_text_index(self._spec)

    def process(self, answer: LLMAnswer):
        outcomes = judge_answer(answer, self._spec, self._config, self._llm_model, self._seeds_by_text)
        self.tally.count("input")
        # One unit, len(outcomes) rows: the rows beyond the first are the fan-out the manifest calls "expanded".
        if len(outcomes) > 1:
            self.tally.count("expanded", len(outcomes) - 1)
        for kind, row in outcomes:
            if kind == "candidate":
                yield text_key(row["row"]["text"]), row
            else:
                yield beam.pvalue.TaggedOutput(REJECTED, row)


class _ResolveFn(beam.DoFn):
    """One text's candidates -> the copy that goes on to the label judge (main output) or REJECTED rows."""

    def process(self, element):
        _, candidates = element
        by_id = {item["row"]["example_id"]: item for item in candidates}
        for kind, row in resolve_duplicates(by_id.values()):
            if kind == "kept":
                yield by_id[row["example_id"]]
            else:
                yield beam.pvalue.TaggedOutput(REJECTED, row)


class GenerateCounterfactuals(beam.PTransform):
    """Root transform: task spec -> {"kept": CLASSIFICATION_EXAMPLE rows, "rejected": REJECTED rows,
    "tallies": (key, count) summed per key: ("stage", STAGE, field) and the label judge's teacher usage,
    "answers": LLMAnswer of generation and of the LLM judge (for usage accounting)}.

    Apply it to the pipeline (`pipeline | GenerateCounterfactuals(...)`). The spec is read when the pipeline is built,
    so a broken spec fails before any work; it travels inside the graph, which suits seed sets (hundreds to a few
    thousand rows), not whole labelled corpora. `teacher` (the run's teacher) and `embed` (its dimension and batch
    size) serve the "teacher" and "both" judges; every LLM call and teacher embedding draws on the run's budget, in
    that order: generation, then the teacher's judgment, then the LLM's.
    """

    def __init__(self, config: GenerateCounterfactualsConfig, llm: ModelAccess, teacher: ModelAccess | None = None,
                 embed: EmbedTeacherConfig | None = None):
        super().__init__()
        self._config = config
        self._llm = llm
        self._teacher = teacher
        self._embed = embed or EmbedTeacherConfig()

    def expand(self, pbegin):
        spec = load_task_spec(self._config.task_spec)
        # Built first, so an impossible judge (no teacher, too many labels for the LLM) fails before any work too.
        judge = JudgeLabels(spec, stage=STAGE, judge=self._config.judge, margin=self._config.judge_margin,
                            llm=self._llm, teacher=self._teacher, embed=self._embed)
        seeds = (
            pbegin
            | "SeedRows" >> beam.Create(seed_outcomes(spec, self._config))
            | "Seeds" >> beam.ParDo(_SeedFn()).with_outputs(REJECTED, TALLIES, main="kept")
        )
        called = (
            pbegin
            | "Units" >> beam.Create(plan_units(spec, self._config))
            | "Requests" >> beam.Map(build_request, spec, self._config)
            | "CallLLM" >> CallLLM(self._llm, STAGE)
        )
        judged = called["answers"] | "Judge" >> beam.ParDo(
            _JudgeFn(spec, self._config, self._llm.spec.model_name)).with_outputs(REJECTED, TALLIES, main="candidates")
        # Duplicates across requests and labels: one group per normalized text, decided in one place.
        resolved = (
            judged["candidates"]
            | "ByText" >> beam.GroupByKey()
            | "Resolve" >> beam.ParDo(_ResolveFn()).with_outputs(REJECTED, main="survivors")
        )
        # After the duplicate check: copies of one text share one label, so judging the surviving copy judges them all.
        labelled = resolved["survivors"] | "JudgeLabels" >> judge
        accepted = labelled["kept"] | "Accepted" >> beam.Map(lambda candidate: candidate["row"])
        kept = (seeds["kept"], accepted) | "Kept" >> beam.Flatten() | "CountKept" >> CountRows(STAGE, "kept")
        rejected = ((seeds[REJECTED], judged[REJECTED], resolved[REJECTED], labelled["rejected"])
                    | "Rejected" >> beam.Flatten() | "CountRejected" >> CountRows(STAGE, "rejected"))
        tallies = sum_tallies((seeds[TALLIES], called["tallies"], judged[TALLIES], labelled["tallies"],
                               kept["tallies"], rejected["tallies"]))
        all_answers = (called["answers"], labelled["answers"]) | "AllAnswers" >> beam.Flatten()
        return {"kept": kept["rows"], "rejected": rejected["rows"], "tallies": tallies, "answers": all_answers}
