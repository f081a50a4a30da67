from __future__ import annotations

import collections
import json
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import apache_beam as beam
import pytest
import yaml
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from data_schemas import CLASSIFICATION_EXAMPLE, REJECTED, stage_balances, validate_rows
from pipelines.budget import RunBudget
from pipelines.clients.base import TaskType, Usage
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.llm_calls import LLMAnswer
from pipelines.model_access import ModelAccess
from pipelines.stages.generate_counterfactuals import (
    STAGE,
    GenerateCounterfactuals,
    GenerateCounterfactualsConfig,
    GenerationUnit,
    _ResolveFn,
    _SeedFn,
    build_request,
    classification_row,
    counterfactual_seeds,
    few_shot_seeds,
    judge_answer,
    plan_units,
    resolve_duplicates,
    seed_outcomes,
    seed_text_index,
    target_labels,
)
from pipelines.stages.generate_counterfactuals import _JudgeFn as _GenerateJudgeFn
from pipelines.stages.label_judge import (
    JUDGE_OUTPUT_TOKENS,
    TEACHER_USAGE,
    JudgeLabels,
    _LLMVerdictFn,
    _TeacherFn,
    judge_request,
    label_prototypes,
    llm_verdict,
    prototype_texts,
    teacher_scores,
    teacher_verdict,
)
from pipelines.stages.task_spec import TaskSpecError, example_id, load_task_spec
from pipelines.text_matching import edit_ratio, text_key
from prompts.label_judgment import MAX_LABELS, choice_model
from tests.dofn_lifecycle import run_dofn
from tests.fakes import classification_llm as scripted
from tests.test_task_spec import DATA, LABELS, TASK_YAML, write_spec

LLM = LLMSpec(backend="custom", model="tests.fakes.classification_llm:factory")
TEACHER = EmbedderSpec(backend="custom", model="tests.fakes.classification_llm:teacher")


def _config(**changes) -> GenerateCounterfactualsConfig:
    return replace(GenerateCounterfactualsConfig(task_spec=TASK_YAML, examples_per_label=4, examples_per_request=4,
                                                 max_seeds_per_label=None), **changes)


# --- Seeds from the task spec -----------------------------------------------------------------------------------------
# Reading the spec itself: test_task_spec.py.


def test_a_reordered_seed_file_plans_the_same_requests(tmp_path):
    """Seed ids come from the text, so reordering the seed file keeps every deterministic choice and cache key."""
    lines = (DATA / "seeds.csv").read_text(encoding="utf-8").splitlines()
    reordered = "\n".join([lines[0], *reversed(lines[1:])]) + "\n"
    document = yaml.safe_load((DATA / "task.yaml").read_text(encoding="utf-8"))
    spec = load_task_spec(write_spec(tmp_path, document, files={"seeds.csv": reordered}))
    assert plan_units(spec, _config()) == plan_units(load_task_spec(TASK_YAML), _config())


def test_rejected_seeds_become_valid_rejected_rows_of_the_stage(tmp_path):
    seeds = '{"text": "Win a free cruise", "label": "spam"}\n{"text": "truncated\n{"text": "Cheap", "label": "eggs"}\n'
    path = write_spec(tmp_path, {"name": "t", "description": "d", "labels": LABELS, "seed_examples": "seeds.jsonl"},
                      files={"seeds.jsonl": seeds})
    rejected = [row for kind, row in seed_outcomes(load_task_spec(path), _config(task_spec=path)) if kind == "rejected"]
    validate_rows(rejected, REJECTED, source="rejected seeds")
    assert [row["reason"] for row in rejected] == ["malformed_row", "unknown_label"]
    assert rejected[0]["payload"] == '{"text": "truncated' and {row["stage"] for row in rejected} == {STAGE}


# --- Config and plan --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"task_spec": ""}, "task_spec"),
    ({"examples_per_label": -1}, "examples_per_label"),
    ({"examples_per_request": 0}, "examples_per_request"),
    ({"examples_per_request": 21}, "examples_per_request"),
    ({"max_seeds_per_label": -1}, "max_seeds_per_label"),
    ({"max_edit_ratio": 0.0}, "max_edit_ratio"),
    ({"temperature": -0.1}, "temperature"),
    ({"judge": "oracle"}, "judge must be one of teacher, llm, both, off"),
    ({"judge_margin": -0.01}, "judge_margin"),
])
def test_config_rejects_impossible_values(changes, message):
    with pytest.raises(ValueError, match=message):
        _config(**changes)


def test_plan_chunks_examples_and_caps_counterfactual_seeds():
    spec = load_task_spec(TASK_YAML)
    units = plan_units(spec, _config(examples_per_label=10, examples_per_request=4, max_seeds_per_label=3))
    generated = [unit for unit in units if unit.kind == "generated"]
    assert [(unit.label, unit.count) for unit in generated] == [
        (label, count) for label in spec.label_names for count in (4, 4, 2)]
    counterfactuals = [unit for unit in units if unit.kind == "counterfactual"]
    assert collections.Counter(unit.label for unit in counterfactuals) == {label: 3 for label in spec.label_names}
    assert len({unit.request_id for unit in units}) == len(units)
    # A cap keeps a run-seeded sample, the same in every run and different under another seed.
    chosen = counterfactual_seeds(spec, _config(max_seeds_per_label=2))
    assert chosen == counterfactual_seeds(spec, _config(max_seeds_per_label=2))
    assert chosen != counterfactual_seeds(spec, _config(max_seeds_per_label=2, seed=7))


def test_targets_are_other_labels_spread_over_the_seeds():
    spec = load_task_spec(TASK_YAML)
    targets = {seed.seed_id: target_labels(spec, seed, _config()) for seed in spec.seeds}
    assert all(len(targets[seed.seed_id]) == 1 and targets[seed.seed_id][0] != seed.label for seed in spec.seeds)
    assert {chosen[0] for chosen in targets.values()} == set(spec.label_names)
    # More edits per seed than other labels: each other label once, never the seed's own.
    docking = spec.seeds_of("docking")[0]
    assert sorted(target_labels(spec, docking, _config(counterfactuals_per_seed=5))) == ["broken_bike", "payment"]
    # A seed keeps its targets when the seed set changes (its cached answers stay valid).
    fewer = replace(spec, seeds=spec.seeds[:3])
    assert all(target_labels(fewer, seed, _config()) == targets[seed.seed_id] for seed in fewer.seeds)
    assert plan_units(spec, _config(examples_per_label=0, counterfactuals_per_seed=0)) == []


def test_few_shot_seeds_are_deterministic_per_request_and_of_the_label():
    spec = load_task_spec(TASK_YAML)
    config = _config(seeds_per_prompt=2)
    payment_texts = {seed.text for seed in spec.seeds_of("payment")}
    shown = [few_shot_seeds(spec, GenerationUnit("generated", "payment", index, 4), config) for index in range(6)]
    assert all(len(texts) == 2 and set(texts) <= payment_texts for texts in shown)
    assert shown == [few_shot_seeds(spec, GenerationUnit("generated", "payment", index, 4), config)
                     for index in range(6)]
    assert len(set(shown)) > 1, "every request of a label showed the same seeds"
    assert len(few_shot_seeds(spec, GenerationUnit("generated", "payment", 0, 4), _config(seeds_per_prompt=9))) == 4


def test_requests_render_the_prompts_and_carry_what_they_showed():
    spec = load_task_spec(TASK_YAML)
    config = _config()
    units = plan_units(spec, config)
    generate = build_request(units[0], spec, config)
    assert generate.prompt_name == "example_generation" and generate.output_model.__name__ == "GeneratedExamples"
    assert 'Write 4 new examples for the label "payment".' in generate.messages[-1].content
    shown_seeds = few_shot_seeds(spec, units[0], config)
    assert all(f"<item>{text}</item>" in generate.messages[-1].content for text in shown_seeds)
    # The prompt's own demonstration counts as shown too, so echoing it is caught.
    assert set(shown_seeds) < set(generate.context["shown"])
    assert "Why does my latest invoice show a fee I never agreed to?" in generate.context["shown"]
    assert generate.config.temperature == 0.7 and generate.config.seed is not None
    assert generate.config.max_output_tokens == 4 * config.max_output_tokens_per_example

    flip = build_request(next(unit for unit in units if unit.kind == "counterfactual"), spec, config)
    seed = flip.context["seed"]
    assert flip.prompt_name == "counterfactual_generation" and flip.config.temperature == 0.0
    assert f"<text>\n{seed.text}\n</text>" in flip.messages[-1].content
    assert scripted.DEMONSTRATION in flip.context["shown"]


def test_a_rerun_makes_the_same_requests_so_the_cache_answers_them_all():
    def keys():
        spec, config = load_task_spec(TASK_YAML), _config()
        return [build_request(unit, spec, config).cache_key("m", "v") for unit in plan_units(spec, config)]

    first = keys()
    assert first == keys() and len(set(first)) == len(first)


def test_a_label_without_seeds_is_asked_without_examples(tmp_path):
    document = {"name": "t", "description": "d", "labels": LABELS, "examples": [{"text": "Lunch?", "label": "ham"}]}
    spec = load_task_spec(write_spec(tmp_path, document))
    config = _config(task_spec=spec.source)
    units = plan_units(spec, config)
    assert [(unit.kind, unit.label) for unit in units] == [("generated", "spam"), ("generated", "ham"),
                                                           ("counterfactual", "ham")]
    assert "<seed_examples></seed_examples>" in build_request(units[0], spec, config).messages[-1].content


# --- Judging answers --------------------------------------------------------------------------------------------------


def _answer(request, value=None, raw=None) -> LLMAnswer:
    ok = value is not None
    return LLMAnswer(request, ok, value, raw if raw is not None else json.dumps(value), None if ok else "invalid",
                     Usage())


def _judge(request, value=None, raw=None, spec=None, config=None):
    spec = spec or load_task_spec(TASK_YAML)
    return judge_answer(_answer(request, value, raw), spec, config or _config(), "scripted-llm",
                        seed_text_index(spec))


def _reasons(outcomes) -> list[str]:
    return ["kept" if kind == "candidate" else row["reason"] for kind, row in outcomes]


@pytest.fixture(scope="module")
def requests():
    spec = load_task_spec(TASK_YAML)
    config = _config(seeds_per_prompt=2)
    by_kind = {}
    for unit in plan_units(spec, config):
        request = build_request(unit, spec, config)
        by_kind.setdefault(unit.kind, request)
        if unit.kind == "counterfactual":
            by_kind.setdefault(request.context["seed"].text, request)
    return by_kind


def test_a_good_answer_gives_one_valid_row_per_text(requests):
    request = requests["generated"]
    outcomes = _judge(request, {"examples": ["Can I pay with PayPal?", "Is there a student discount?"]})
    assert _reasons(outcomes) == ["kept", "kept"]
    rows = [item["row"] for _, item in outcomes]
    validate_rows(rows, CLASSIFICATION_EXAMPLE, source="generated rows")
    assert rows[0]["origin"] == "generated" and rows[0]["label"] == "payment"
    assert rows[0]["negative_labels"] == ["broken_bike", "docking"]
    assert rows[0]["prompt_version"] == "example_generation@1" and rows[0]["llm_model"] == "scripted-llm"
    assert rows[0]["counterfactual_of"] is None
    assert rows[0]["example_id"] == example_id("bike_share_support", "generated", request.request_id, 0)
    assert all(item["raw"] == json.dumps({"examples": [r["text"] for r in rows]}) for _, item in outcomes)


@pytest.mark.parametrize(("texts", "reasons"), [
    (["Fine", "...", "  ?! "], ["kept", "empty_text", "empty_text"]),
    (["a", "b", "c", "d", "e", "f"], ["kept"] * 4 + ["surplus"] * 2),
    (["THE SADDLE on my bike is loose and will not stay up"], ["duplicate"]),  # case and punctuation do not matter
    (["Every dock at Central Station is full, where can I return my bike?"], ["duplicate"]),  # another label's seed
    (["Why does my latest invoice show a fee I never agreed to?"], ["copies_example"]),  # the prompt's demonstration
])
def test_noisy_generated_answers(requests, texts, reasons):
    assert _reasons(_judge(requests["generated"], {"examples": texts})) == reasons


def test_a_copied_few_shot_seed_is_copies_example(requests):
    request = requests["generated"]
    shown_seed = few_shot_seeds(load_task_spec(TASK_YAML), request.context["unit"], _config(seeds_per_prompt=2))[0]
    assert _reasons(_judge(request, {"examples": [shown_seed.upper()]})) == ["copies_example"]


@pytest.mark.parametrize("raw", ['{"examples": ["Can I pay with', "", "I'm sorry, I cannot help with that."])
def test_a_failed_answer_is_one_llm_failed_row_keeping_the_raw_text(requests, raw):
    [(kind, row)] = _judge(requests["generated"], raw=raw)
    assert (kind, row["reason"], row["raw_answer"]) == ("rejected", "llm_failed", raw)
    assert row["record_id"] == requests["generated"].request_id
    assert json.loads(row["payload"])["label"] == "payment"
    validate_rows([row], REJECTED, source="llm_failed row")


def test_a_good_counterfactual_points_at_its_seed(requests):
    request = requests["counterfactual"]
    seed, target = request.context["seed"], request.context["unit"].target
    edited = " ".join(seed.text.split()[:-2] + ["and no dock is free."])
    [(kind, item)] = _judge(request, {"text": edited})
    row = item["row"]
    assert kind == "candidate"
    validate_rows([row], CLASSIFICATION_EXAMPLE, source="counterfactual row")
    assert (row["origin"], row["counterfactual_of"], row["original_label"]) == ("counterfactual", seed.seed_id,
                                                                                 seed.label)
    assert row["label"] == target != seed.label
    assert row["negative_labels"][0] == seed.label, "the original label is the hardest negative"
    assert set(row["negative_labels"]) == set(load_task_spec(TASK_YAML).label_names) - {target}
    assert row["prompt_version"] == "counterfactual_generation@1"


@pytest.mark.parametrize(("seed_text", "edited", "reason"), [
    ("How do I get a refund for my annual pass?", "How do I get a refund for my annual pass", "unchanged"),
    ("How do I get a refund for my annual pass?", scripted.DEMONSTRATION, "copies_example"),
    ("How do I get a refund for my annual pass?", "The bike I took at Elm Street has a flat front tyre.",
     "duplicate"),
    ("How do I get a refund for my annual pass?", "Please open more stations in the north of the city.",
     "not_minimal"),
    ("How do I get a refund for my annual pass?", "- - -", "empty_text"),
])
def test_noisy_counterfactuals(requests, seed_text, edited, reason):
    outcomes = _judge(requests[seed_text], {"text": edited})
    assert _reasons(outcomes) == [reason]
    [(_, row)] = outcomes
    assert row["raw_answer"] == json.dumps({"text": edited}) and json.loads(row["payload"])["text"] == edited


def test_edit_ratio_threshold_admits_the_prompts_own_demonstration():
    ratio = edit_ratio("The battery lasts all day and the screen is bright even in sunlight.", scripted.DEMONSTRATION)
    assert ratio == pytest.approx(6 / 14)
    assert ratio <= GenerateCounterfactualsConfig(task_spec="x").max_edit_ratio


def test_duplicates_keep_one_copy_and_conflicting_labels_keep_none():
    def candidate(origin, label, row_id):
        return {"row": {"example_id": row_id, "origin": origin, "label": label, "text": "same"}, "raw": "r"}

    outcomes = resolve_duplicates([candidate("generated", "a", "1"), candidate("counterfactual", "a", "9"),
                                   candidate("generated", "a", "0")])
    assert [(kind, row.get("record_id", row.get("example_id"))) for kind, row in outcomes] == [
        ("kept", "9"), ("rejected", "0"), ("rejected", "1")]
    assert {row["reason"] for kind, row in outcomes if kind == "rejected"} == {"duplicate"}
    conflicting = resolve_duplicates([candidate("generated", "a", "1"), candidate("generated", "b", "2")])
    assert [(kind, row["reason"]) for kind, row in conflicting] == [("rejected", "conflicting_labels")] * 2


def test_seed_rows_are_valid_and_skipped_when_not_included():
    spec = load_task_spec(TASK_YAML)
    outcomes = seed_outcomes(spec, _config())
    kept = [row for kind, row in outcomes if kind == "kept"]
    validate_rows(kept, CLASSIFICATION_EXAMPLE, source="seed rows")
    assert {row["origin"] for row in kept} == {"seed"} and len(kept) == 12
    assert all(row["llm_model"] is None and row["prompt_version"] is None for row in kept)
    assert collections.Counter(kind for kind, _ in seed_outcomes(spec, _config(include_seed_examples=False))) == {
        "skipped": 12, "rejected": 1}


# --- The label judge (pure) ------------------------------------------------------------------------------------------


def _unit(*values: float) -> list[float]:
    vector = [float(value) for value in values]
    norm = sum(value * value for value in vector) ** 0.5
    return [value / norm for value in vector]


@pytest.mark.parametrize(("scores", "target", "margin", "keep", "best"), [
    ({"a": 0.8, "b": 0.3}, "a", 0.0, True, "a"),
    ({"a": 0.3, "b": 0.8}, "a", 0.0, False, "b"),
    ({"a": 0.5, "b": 0.5}, "a", 0.0, True, "a"),  # a tie: the teacher cannot tell them apart, so it keeps the label
    ({"a": 0.78, "b": 0.8}, "a", 0.0, False, "b"),
    ({"a": 0.78, "b": 0.8}, "a", 0.05, True, "b"),  # within the margin of the best
    ({"a": 0.70, "b": 0.8}, "a", 0.05, False, "b"),
])
def test_teacher_verdict_keeps_the_target_only_when_it_is_the_best_label_within_the_margin(
        scores, target, margin, keep, best):
    assert teacher_verdict(scores, target, margin) == (keep, best)


def test_a_prototype_weighs_the_description_and_the_seed_centroid_equally():
    # Label "a": description on axis 0, three seeds on axis 1. Label "b": description only, on axis 2.
    seeds = {"a": [(f"s{index}", _unit(0, 1, 0)) for index in range(3)]}
    prototypes = label_prototypes(["a", "b"], {"a": _unit(1, 0, 0), "b": _unit(0, 0, 1)}, seeds)
    assert prototypes["a"].tolist() == pytest.approx(_unit(1, 1, 0)), "three seeds outweighed the description"
    assert prototypes["b"].tolist() == pytest.approx(_unit(0, 0, 1))
    # A label with no vector at all (its embeddings failed) has no prototype.
    assert set(label_prototypes(["a", "b", "c"], {"a": _unit(1, 0, 0), "b": _unit(0, 0, 1)}, {})) == {"a", "b"}
    scores = teacher_scores(_unit(1, 1, 0), prototypes)
    assert scores["a"] == pytest.approx(1.0) and scores["b"] == pytest.approx(0.0)


def test_a_counterfactual_is_judged_without_its_own_seed():
    """An edit shares most words with its seed: with the seed in the prototypes, the original label would win."""
    # Axis 0: the words the edit kept from its seed; axis 1: the original label's word; axis 3: the target's word.
    seed, edit = _unit(1, 1, 0, 0), _unit(1, 0, 0, 0.3)
    descriptions = {"original": _unit(0, 1, 0, 0), "target": _unit(0, 0, 0, 1)}
    seeds = {"original": [("seed-1", seed)]}
    with_seed = teacher_scores(edit, label_prototypes(["original", "target"], descriptions, seeds))
    assert teacher_verdict(with_seed, "target") == (False, "original")
    left_out = teacher_scores(edit, label_prototypes(["original", "target"], descriptions, seeds,
                                                     exclude_seed="seed-1"))
    assert teacher_verdict(left_out, "target") == (True, "target")


def test_the_teacher_embeds_every_label_description_and_seed_for_classification():
    spec = load_task_spec(TASK_YAML)
    items = prototype_texts(spec)
    assert [item["text"] for item in items[:3]] == [label.description for label in spec.labels]
    assert [item["text"] for item in items[3:]] == [seed.text for seed in spec.seeds]
    assert {item["task_type"] for item in items} == {TaskType.CLASSIFICATION.value}
    assert len({item["id"] for item in items}) == len(items)


def _candidate(text: str, label: str, counterfactual_of: str | None = None) -> dict:
    spec = load_task_spec(TASK_YAML)
    origin = "generated" if counterfactual_of is None else "counterfactual"
    row_id = example_id(spec.name, origin, text, 0)
    original = next((seed.label for seed in spec.seeds if seed.seed_id == counterfactual_of), None)
    return {"row": classification_row(spec, row_id=row_id, text=text, label=label, origin=origin,
                                      counterfactual_of=counterfactual_of, original_label=original),
            "raw": json.dumps({"text": text})}


def _teacher_outcomes(candidate: dict, vector=None, reason=None, *, drop_label: str | None = None,
                      drop_reason: str = "embedding_failed"):
    """_TeacherFn's outcomes for one candidate, given the keyword teacher's vectors of every label description and seed
    (none for `drop_label`'s, which failed with `drop_reason`) and the candidate's `vector` (default: the teacher's)."""
    spec = load_task_spec(TASK_YAML)
    teacher = scripted.teacher()
    dropped = set() if drop_label is None else {f"label/{drop_label}"} | {
        f"seed/{seed.seed_id}" for seed in spec.seeds_of(drop_label)}
    prototypes = [(item["id"], None, drop_reason) if item["id"] in dropped else
                  (item["id"], teacher.embed([item["text"]], TaskType.CLASSIFICATION)[0].tolist(), None)
                  for item in prototype_texts(spec)]
    if vector is None and reason is None:
        vector = teacher.embed([candidate["row"]["text"]], TaskType.CLASSIFICATION)[0].tolist()
    judge = _TeacherFn(spec, 0.0, STAGE)
    element = (candidate["row"]["example_id"], {"candidates": [candidate], "vectors": [(vector, reason)]})
    return [("rejected", output.value) if isinstance(output, beam.pvalue.TaggedOutput) else ("kept", output)
            for output in judge.process(element, prototypes)]


def test_the_teacher_rejects_a_text_that_reads_as_another_label_and_keeps_a_good_one():
    spec = load_task_spec(TASK_YAML)
    [(kind, row)] = _teacher_outcomes(_candidate(scripted.WRONG_LABEL_EXAMPLE, "payment"))
    assert (kind, row["reason"]) == ("rejected", "label_mismatch")
    assert "nearest 'broken_bike'" in row["detail"] and "not its label 'payment'" in row["detail"]
    assert row["raw_answer"] == json.dumps({"text": scripted.WRONG_LABEL_EXAMPLE})
    validate_rows([row], REJECTED, source="label_mismatch row")

    declined = next(seed for seed in spec.seeds if seed.text.startswith("My card was declined"))
    [(kind, row)] = _teacher_outcomes(_candidate(scripted.SAME_MEANING_EDIT, "docking", declined.seed_id))
    assert (kind, row["reason"]) == ("rejected", "label_mismatch") and "nearest 'payment'" in row["detail"]

    good = _candidate("My card was declined when I tried to buy a and no dock is free, every dock is full.",
                      "docking", declined.seed_id)
    assert _teacher_outcomes(good) == [("kept", good)]


def test_the_teacher_leaves_a_counterfactuals_own_seed_out_of_the_prototypes():
    """Its "brakes" outweigh "charged" only while its own seed (the one brakes seed) is in broken_bike's centroid."""
    spec = load_task_spec(TASK_YAML)
    brakes = next(seed for seed in spec.seeds if seed.text.startswith("The brakes on bike 4417"))
    edit = "The brakes on bike 4417 barely work, please check and I was charged."
    as_counterfactual = _candidate(edit, "payment", brakes.seed_id)
    assert _teacher_outcomes(as_counterfactual) == [("kept", as_counterfactual)]
    [(kind, row)] = _teacher_outcomes(_candidate(edit, "payment"))  # a new example: every seed counts
    assert (kind, row["reason"]) == ("rejected", "label_mismatch") and "nearest 'broken_bike'" in row["detail"]


@pytest.mark.parametrize(("reason", "expected"), [
    ("embedding_failed", "judge_failed"),
    ("skipped_by_budget", "skipped_by_budget"),
])
def test_a_text_the_teacher_could_not_embed_gets_no_verdict(reason, expected):
    [(kind, row)] = _teacher_outcomes(_candidate("Can I pay with PayPal?", "payment"), reason=reason)
    assert (kind, row["reason"]) == ("rejected", expected) and "could not judge" in row["detail"]


@pytest.mark.parametrize(("drop_reason", "expected"), [
    ("embedding_failed", "judge_failed"),
    ("skipped_by_budget", "skipped_by_budget"),
])
def test_a_label_without_a_prototype_leaves_every_text_unjudged(drop_reason, expected):
    """The text might belong to the label the teacher cannot see: no verdict, whatever its own label."""
    [(kind, row)] = _teacher_outcomes(_candidate("Can I pay with PayPal?", "payment"), drop_label="docking",
                                      drop_reason=drop_reason)
    assert (kind, row["reason"]) == ("rejected", expected) and "label 'docking'" in row["detail"]


def test_the_llm_judge_asks_which_numbered_label_fits_with_a_bounded_answer():
    spec = load_task_spec(TASK_YAML)
    candidate = _candidate(scripted.WRONG_LABEL_EXAMPLE, "payment")
    request = judge_request(candidate, spec)
    user = request.messages[-1].content
    assert "1. payment: Charges, refunds, passes and payment methods\n2. broken_bike:" in user
    assert f"<text>\n{scripted.WRONG_LABEL_EXAMPLE}\n</text>" in user
    assert request.request_id == f"judge/{candidate['row']['example_id']}" and request.context is candidate
    assert request.config.temperature == 0.0 and request.config.max_output_tokens == JUDGE_OUTPUT_TOKENS
    # The answer is a label number, bounded to this task's 3 labels (a local model's decoding can choose no other).
    schema = request.output_model.model_json_schema()["properties"]["label"]
    assert (schema["minimum"], schema["maximum"]) == (1, 3)
    # The same text asks the same request whatever label it was written for: one cached judgment per text.
    relabelled = judge_request(_candidate(scripted.WRONG_LABEL_EXAMPLE, "docking"), spec)
    assert relabelled.cache_key("m", "v") == request.cache_key("m", "v")
    # Requests travel to Beam workers: the dynamic output model pickles by name, even to a process that never built it.
    assert pickle.loads(pickle.dumps(request)).output_model is choice_model(3)
    loaded = subprocess.run(
        [sys.executable, "-c", "import pickle, sys; model = pickle.loads(sys.stdin.buffer.read()).output_model; "
         "print(model.__name__, model.model_json_schema()['properties']['label']['maximum'])"],
        input=pickle.dumps(request), capture_output=True, check=True, cwd=Path(__file__).parents[1])
    assert loaded.stdout.decode().split() == ["LabelChoice3", "3"]
    assert scripted.judge_label(user) == 2


def _judgment(request, value=None, raw=None, source="backend") -> LLMAnswer:
    ok = value is not None
    return LLMAnswer(request, ok, value, raw if raw is not None else json.dumps(value), None if ok else "invalid",
                     Usage(), source=source)


def test_llm_verdicts():
    spec = load_task_spec(TASK_YAML)
    request = judge_request(_candidate(scripted.WRONG_LABEL_EXAMPLE, "payment"), spec)
    assert llm_verdict(_judgment(request, {"label": 1}), spec) == (None, None)
    reason, detail = llm_verdict(_judgment(request, {"label": 2}), spec)
    assert reason == "label_mismatch" and detail == "the LLM judge chose 'broken_bike' (label 2), not 'payment'"
    assert llm_verdict(_judgment(request, raw='{"label": 7}'), spec)[0] == "judge_failed"
    assert llm_verdict(_judgment(request, raw="", source="budget"), spec)[0] == "skipped_by_budget"


def test_an_impossible_judge_fails_when_the_pipeline_is_built(tmp_path):
    spec = load_task_spec(TASK_YAML)
    with pytest.raises(ValueError, match="needs the run's teacher"):
        JudgeLabels(spec, stage=STAGE, judge="teacher", llm=ModelAccess.llm(LLM))
    with pytest.raises(ValueError, match="judge must be one of"):
        JudgeLabels(spec, stage=STAGE, judge="oracle", llm=ModelAccess.llm(LLM),
                    teacher=ModelAccess.embedder(TEACHER))
    many = [{"name": f"l{index}", "description": f"label {index}"} for index in range(MAX_LABELS + 1)]
    path = write_spec(tmp_path, {"name": "t", "description": "d", "labels": many,
                      "examples": [{"text": "hi", "label": "l0"}]})
    with pytest.raises(TaskSpecError, match=f"{MAX_LABELS + 1} labels, more than the {MAX_LABELS}"):
        JudgeLabels(load_task_spec(path), stage=STAGE, judge="llm", llm=ModelAccess.llm(LLM))
    JudgeLabels(load_task_spec(path), stage=STAGE, judge="teacher",  # the teacher has no limit
                teacher=ModelAccess.embedder(TEACHER))
    with pytest.raises(ValueError, match="needs the run's teacher"):
        _ = TestPipeline() | GenerateCounterfactuals(_config(), ModelAccess.llm(LLM))


# --- The PTransform ---------------------------------------------------------------------------------------------------

#: What the scripted LLM's answers give before the label judge (tests/fakes/classification_llm.py).
SURFACE_REASONS = {"unknown_label": 1, "llm_failed": 2, "copies_example": 2, "surplus": 1, "conflicting_labels": 2,
                   "duplicate": 3, "unchanged": 1, "not_minimal": 1}
#: The texts the judge sees: 3 new examples and 7 counterfactuals survive the surface checks.
JUDGED = 10
EVERY_DOCK = "Every dock at Central Station is full, where can I return and I was charged twice, please refund me."
GOOD_EDIT = "The bike I took at Elm Street has a flat and I was charged twice, please refund me."


def _run_stage(config, check_rows, *, answers: int, budget: RunBudget | None = None, teacher=TEACHER):
    """Run the stage on TestPipeline: rows valid, every unit accounted for, the stage balanced, then `check_rows`."""
    spec = load_task_spec(config.task_spec)
    planned = spec.seed_rows_read + len(plan_units(spec, config))

    def check(elements):
        kept = [row for kind, row in elements if kind == "kept"]
        rejected = [row for kind, row in elements if kind == "rejected"]
        tallies = {value[0]: value[1] for kind, value in elements if kind == "tally"}
        validate_rows(kept, CLASSIFICATION_EXAMPLE, source="kept")
        validate_rows(rejected, REJECTED, source="rejected")
        assert {row["stage"] for row in rejected} == {STAGE}
        seeds = {row["example_id"]: row for row in kept if row["origin"] == "seed"}
        for row in kept:
            if row["origin"] == "counterfactual":
                seed = seeds[row["counterfactual_of"]]
                assert row["original_label"] == seed["label"] != row["label"]
                assert row["text"] != seed["text"]
        assert len({row["example_id"] for row in kept}) == len(kept)
        assert len({" ".join(row["text"].lower().split()) for row in kept}) == len(kept)
        stage = {field: tallies.get(("stage", STAGE, field), 0) for field in ("input", "kept", "expanded", "skipped")}
        counts = {"stage": STAGE, **stage, "rejected": len(rejected), "reasons": {}}
        assert (counts["input"], counts["kept"], counts["expanded"]) == (planned, len(kept), 7)
        assert stage_balances(counts), counts
        check_rows(kept, rejected, tallies)

    with TestPipeline() as pipeline:
        outputs = pipeline | GenerateCounterfactuals(
            config, ModelAccess.llm(LLM, budget=budget),
            teacher=None if teacher is None else ModelAccess.embedder(teacher, budget=budget))
        tagged = (
            outputs["kept"] | "TagKept" >> beam.Map(lambda row: ("kept", row)),
            outputs["rejected"] | "TagRejected" >> beam.Map(lambda row: ("rejected", row)),
            outputs["tallies"] | "TagTallies" >> beam.Map(lambda tally: ("tally", tally)),
        ) | beam.Flatten()
        assert_that(tagged, check)
        assert_that(outputs["answers"] | beam.combiners.Count.Globally(), equal_to([answers]), label="Answers")


def _by_text(rows) -> dict[str, dict]:
    return {json.loads(row["payload"])["text"]: row for row in rows}


@pytest.mark.slow
def test_the_stage_writes_valid_rows_and_accounts_for_every_unit():
    """The scripted LLM's answers and the keyword teacher's vectors are known, so every outcome is too."""

    def check(kept, rejected, tallies):
        assert collections.Counter(row["reason"] for row in rejected) == {**SURFACE_REASONS, "label_mismatch": 3}
        assert collections.Counter(row["origin"] for row in kept) == {"seed": 12, "generated": 2, "counterfactual": 5}
        mismatched = _by_text(row for row in rejected if row["reason"] == "label_mismatch")
        assert set(mismatched) == {scripted.WRONG_LABEL_EXAMPLE, scripted.SAME_MEANING_EDIT, EVERY_DOCK}
        assert "nearest 'payment'" in mismatched[scripted.SAME_MEANING_EDIT]["detail"]
        kept_texts = {row["text"]: row for row in kept}
        assert kept_texts[GOOD_EDIT]["label"] == "payment"
        assert "Can I pay for a monthly pass with PayPal?" in kept_texts
        # The teacher embedded 3 descriptions, 12 seeds and the 10 texts judged (no cache: all computed).
        assert tallies[("embedding", TEACHER_USAGE, "texts_embedded")] == 3 + 12 + JUDGED
        assert tallies[("cost", TEACHER_USAGE)] == 0

    _run_stage(_config(seeds_per_prompt=2), check, answers=15)


@pytest.mark.slow
@pytest.mark.parametrize(("judge", "mismatched", "answers"), [
    # The LLM judge keeps EVERY_DOCK (a tie, see the scripted LLM) and is asked about all 10 texts.
    ("llm", {scripted.WRONG_LABEL_EXAMPLE, scripted.SAME_MEANING_EDIT}, 15 + JUDGED),
    # Both: the teacher rejects 3, the LLM is asked about the other 7 and agrees with the teacher on them.
    ("both", {scripted.WRONG_LABEL_EXAMPLE, scripted.SAME_MEANING_EDIT, EVERY_DOCK}, 15 + JUDGED - 3),
    ("off", set(), 15),
])
def test_every_judge_accounts_for_every_text(judge, mismatched, answers):
    def check(kept, rejected, tallies):
        rejections = _by_text(row for row in rejected if row["reason"] == "label_mismatch")
        assert set(rejections) == mismatched
        assert collections.Counter(row["reason"] for row in rejected) == {
            **SURFACE_REASONS, **({"label_mismatch": len(mismatched)} if mismatched else {})}
        assert sum(row["origin"] != "seed" for row in kept) == JUDGED - len(mismatched)
        if judge == "llm":
            assert "the LLM judge chose 'broken_bike'" in rejections[scripted.WRONG_LABEL_EXAMPLE]["detail"]
            assert rejections[scripted.WRONG_LABEL_EXAMPLE]["raw_answer"] == '{"label": 2}'
        assert (("embedding", TEACHER_USAGE, "texts_embedded") in tallies) == (judge == "both")

    _run_stage(_config(seeds_per_prompt=2, judge=judge), check, answers=answers,
               teacher=TEACHER if judge == "both" else None)


@pytest.mark.slow
@pytest.mark.parametrize("max_calls", [15, 17])
def test_the_llm_judge_draws_on_the_run_budget_after_generation(max_calls):
    """15 generation calls come first; the judge gets what is left, and a text it cannot ask about is not kept."""
    judged = max_calls - 15

    def check(kept, rejected, tallies):
        reasons = collections.Counter(row["reason"] for row in rejected)
        assert reasons["skipped_by_budget"] == JUDGED - judged
        assert sum(row["origin"] != "seed" for row in kept) + reasons["label_mismatch"] == judged
        skipped = [row for row in rejected if row["reason"] == "skipped_by_budget"]
        assert all(json.loads(row["payload"])["origin"] in ("generated", "counterfactual") for row in skipped)

    _run_stage(_config(seeds_per_prompt=2, judge="llm"), check, answers=15 + JUDGED, budget=RunBudget(max_calls),
               teacher=None)


def test_a_broken_spec_fails_when_the_pipeline_is_built(tmp_path):
    path = write_spec(tmp_path, {"name": "t", "description": "d", "labels": LABELS[:1]})
    pipeline = TestPipeline()
    with pytest.raises(TaskSpecError, match="at least 2 labels"):
        _ = pipeline | GenerateCounterfactuals(_config(task_spec=path), ModelAccess.llm(LLM),
                                               teacher=ModelAccess.embedder(TEACHER))


# --- The DoFns, called directly ---------------------------------------------------------------------------------------


def test_seed_fn_counts_every_seed_row_as_input_and_a_left_out_seed_as_skipped():
    spec = load_task_spec(TASK_YAML)
    included = run_dofn(_SeedFn(), seed_outcomes(spec, _config()))
    assert len(included.main) == 12 and {row["origin"] for row in included.main} == {"seed"}
    assert included.reasons() == [row["reason"] for kind, row in seed_outcomes(spec, _config()) if kind == "rejected"]
    assert included.tallies == {("stage", STAGE, "input"): 13}
    left_out = run_dofn(_SeedFn(), seed_outcomes(spec, _config(include_seed_examples=False)))
    assert left_out.main == [] and len(left_out.reasons()) == 1
    assert left_out.tallies == {("stage", STAGE, "input"): 13, ("stage", STAGE, "skipped"): 12}


def test_judge_fn_keys_candidates_by_text_rejects_seed_copies_and_counts_the_fan_out(requests):
    request = requests["generated"]
    answers = [_answer(request, {"examples": ["Can I pay with PayPal?", "Fine", "..."]}),
               # A seed's text, read in setup(): the seed index is built there, once per worker.
               _answer(request, {"examples": ["THE SADDLE on my bike is loose and will not stay up"]}),
               _answer(request, raw='{"examples": ["Can I pay with')]
    outputs = run_dofn(_GenerateJudgeFn(load_task_spec(TASK_YAML), _config(), "scripted-llm"), answers)
    assert [(key, item["row"]["text"]) for key, item in outputs.main] == [
        (text_key("Can I pay with PayPal?"), "Can I pay with PayPal?"), (text_key("Fine"), "Fine")]
    assert outputs.reasons() == ["empty_text", "duplicate", "llm_failed"]
    validate_rows(outputs.tagged["rejected"], REJECTED)
    # Three answers in; the first gives three rows, two beyond its one unit.
    assert outputs.tallies == {("stage", STAGE, "input"): 3, ("stage", STAGE, "expanded"): 2}


def test_resolve_fn_passes_one_copy_of_a_text_on_and_rejects_the_others():
    def candidate(origin, label, row_id):
        return {"row": {"example_id": row_id, "origin": origin, "label": label, "text": "same"}, "raw": "r"}

    copies = [candidate("generated", "a", "1"), candidate("counterfactual", "a", "9")]
    outputs = run_dofn(_ResolveFn(), [("same", copies), ("other", [candidate("generated", "b", "5")])])
    assert [item["row"]["example_id"] for item in outputs.main] == ["9", "5"]
    assert [(row["record_id"], row["reason"]) for row in outputs.tagged["rejected"]] == [("1", "duplicate")]


def test_llm_verdict_fn_passes_the_candidate_on_or_tags_the_judges_reason():
    spec = load_task_spec(TASK_YAML)
    candidate = _candidate(scripted.WRONG_LABEL_EXAMPLE, "payment")
    request = judge_request(candidate, spec)
    outputs = run_dofn(_LLMVerdictFn(spec, STAGE), [
        _judgment(request, {"label": 1}), _judgment(request, {"label": 2}), _judgment(request, raw='{"label": 7}')])
    assert outputs.main == [candidate]
    assert outputs.reasons() == ["label_mismatch", "judge_failed"]
    assert outputs.tagged["rejected"][1]["raw_answer"] == '{"label": 7}'
    validate_rows(outputs.tagged["rejected"], REJECTED)
