from __future__ import annotations

import collections
import json
from dataclasses import replace
from pathlib import Path

import apache_beam as beam
import pytest
import yaml
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from data_schemas import CLASSIFICATION_EXAMPLE, REJECTED, stage_balances, validate_rows
from pipelines.clients.base import Usage
from pipelines.clients.factory import LLMSpec
from pipelines.llm_calls import LLMAnswer
from pipelines.stages.generate_counterfactuals import (
    STAGE,
    GenerateCounterfactuals,
    GenerateCounterfactualsConfig,
    GenerationUnit,
    TaskSpecError,
    build_request,
    counterfactual_seeds,
    edit_ratio,
    example_id,
    few_shot_seeds,
    judge_answer,
    load_task_spec,
    plan_units,
    resolve_duplicates,
    seed_outcomes,
    seed_text_index,
    target_labels,
)
from tests import scripted_classification_llm as scripted

DATA = Path(__file__).parent / "data" / "counterfactuals"
TASK_YAML = str(DATA / "task.yaml")
TASK_JSON = str(DATA / "task_inline.json")
LLM = LLMSpec(backend="custom", model="tests.scripted_classification_llm:factory")
LABELS = [{"name": "spam", "description": "Unsolicited advertising"},
          {"name": "ham", "description": "A message the reader wants"}]


def _config(**changes) -> GenerateCounterfactualsConfig:
    return replace(GenerateCounterfactualsConfig(task_spec=TASK_YAML, examples_per_label=4, examples_per_request=4,
                                                 max_seeds_per_label=None), **changes)


def _write(tmp_path: Path, document, *, name: str = "task.yaml", files: dict[str, str] | None = None) -> str:
    for file_name, text in (files or {}).items():
        (tmp_path / file_name).write_text(text, encoding="utf-8")
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else
                    (json.dumps(document) if name.endswith(".json") else yaml.safe_dump(document)), encoding="utf-8")
    return str(path)


# --- Task spec --------------------------------------------------------------------------------------------------------


def test_loads_the_yaml_spec_with_a_csv_seed_file_and_named_columns():
    spec = load_task_spec(TASK_YAML)
    assert spec.name == "bike_share_support"
    assert spec.label_names == ("payment", "broken_bike", "docking")
    assert len(spec.seeds) == 12 and spec.seed_rows_read == 13
    assert collections.Counter(seed.label for seed in spec.seeds) == {"payment": 4, "broken_bike": 4, "docking": 4}
    # Quoted CSV fields keep their commas; the seed path was resolved relative to the spec file.
    assert "The brakes on bike 4417 barely work, please check it." in {seed.text for seed in spec.seeds}
    [bad] = spec.rejected_seeds
    assert bad.reason == "unknown_label"
    assert bad.location == f"{DATA / 'seeds.csv'} line 14"
    assert "field 'topic'" in bad.detail and "'lost_item'" in bad.detail
    assert json.loads(bad.payload)["row"]["message"] == "I left my phone in the basket of a bike this morning."


def test_loads_a_json_spec_with_inline_examples():
    spec = load_task_spec(TASK_JSON)
    assert spec.label_names == ("positive", "negative")
    assert [seed.location for seed in spec.seeds] == [f"{TASK_JSON} examples[{index}]" for index in range(4)]
    assert spec.rejected_seeds == ()


def test_seed_ids_come_from_the_text_not_the_line(tmp_path):
    """Reordering the seed file keeps every id, hence every deterministic choice and cache key."""
    lines = (DATA / "seeds.csv").read_text(encoding="utf-8").splitlines()
    reordered = "\n".join([lines[0], *reversed(lines[1:])]) + "\n"
    document = yaml.safe_load((DATA / "task.yaml").read_text(encoding="utf-8"))
    spec = load_task_spec(_write(tmp_path, document, files={"seeds.csv": reordered}))
    original = load_task_spec(TASK_YAML)
    assert {seed.seed_id: seed.text for seed in spec.seeds} == {seed.seed_id: seed.text for seed in original.seeds}
    assert plan_units(spec, _config()) == plan_units(original, _config())


def test_bad_seed_rows_become_rejected_rows_naming_line_and_field(tmp_path):
    rows = [
        '{"text": "Win a free cruise now", "label": "spam"}',
        '{"text": "Lunch at noon?", "label": "ham"}',
        '{"text": "truncated',
        '["not", "an", "object"]',
        '{"text": "   ", "label": "spam"}',
        '{"label": "spam"}',
        '{"text": "Meeting moved to 3pm", "label": ""}',
        '{"text": "Cheap watches", "label": "eggs"}',
        '{"text": "WIN a free cruise, now!", "label": "ham"}',
        '{"text": 42, "label": "spam"}',
        "",
    ]
    path = _write(tmp_path, {"name": "t", "description": "d", "labels": LABELS, "seed_examples": "seeds.jsonl"},
                  files={"seeds.jsonl": "\n".join(rows)})
    spec = load_task_spec(path)
    assert [seed.text for seed in spec.seeds] == ["Win a free cruise now", "Lunch at noon?"]
    seeds_path = tmp_path / "seeds.jsonl"
    assert [(bad.reason, bad.location) for bad in spec.rejected_seeds] == [
        ("malformed_row", f"{seeds_path} line 3"),
        ("malformed_row", f"{seeds_path} line 4"),
        ("empty_text", f"{seeds_path} line 5"),
        ("empty_text", f"{seeds_path} line 6"),
        ("missing_label", f"{seeds_path} line 7"),
        ("unknown_label", f"{seeds_path} line 8"),
        ("duplicate_seed", f"{seeds_path} line 9"),
        ("malformed_row", f"{seeds_path} line 10"),
    ]
    assert "the same text as" in spec.rejected_seeds[6].detail and "line 1" in spec.rejected_seeds[6].detail
    assert "'text' is int" in spec.rejected_seeds[7].detail
    # Every rejected seed becomes a valid REJECTED row of this stage, with the raw row as payload.
    rejected = [row for kind, row in seed_outcomes(spec, _config(task_spec=path)) if kind == "rejected"]
    validate_rows(rejected, REJECTED, source="rejected seeds")
    assert rejected[0]["payload"] == '{"text": "truncated' and {row["stage"] for row in rejected} == {STAGE}


def test_csv_rows_with_shifted_columns_are_malformed(tmp_path):
    seeds = "text,label\nWin a free cruise,spam\nLunch at noon, tomorrow?,ham\n\nSee you,ham\n"
    path = _write(tmp_path, {"name": "t", "description": "d", "labels": LABELS, "seed_examples": "seeds.csv"},
                  files={"seeds.csv": seeds})
    spec = load_task_spec(path)
    assert [seed.text for seed in spec.seeds] == ["Win a free cruise", "See you"]
    [bad] = spec.rejected_seeds
    assert (bad.reason, bad.location) == ("malformed_row", f"{tmp_path / 'seeds.csv'} line 3")


def test_int_labels_match_label_names(tmp_path):
    # SST-2 style seeds label with 0/1, and YAML reads `name: 0` as an int: labels compare as strings.
    document = {"name": "t", "description": "d",
                "labels": [{"name": 0, "description": "negative"}, {"name": 1, "description": "positive"}],
                "examples": [{"text": "awful", "label": 0}, {"text": "lovely", "label": "1"}]}
    spec = load_task_spec(_write(tmp_path, document))
    assert spec.label_names == ("0", "1")
    assert [(seed.text, seed.label) for seed in spec.seeds] == [("awful", "0"), ("lovely", "1")]


@pytest.mark.parametrize(("document", "files", "message"), [
    ({"name": "t", "description": "d", "labels": LABELS[:1]}, {}, "at least 2 labels"),
    ({"name": "t", "description": "d", "labels": [LABELS[0], LABELS[0]]}, {},
     r"labels\[1\]: duplicate label name 'spam' \(first at labels\[0\]\)"),
    ({"name": "t", "description": "d", "labels": [LABELS[0], {"name": "ham"}]}, {},
     r"labels\[1\]: missing or empty 'description'"),
    ({"name": "t", "description": "d"}, {}, "missing 'labels'"),
    ({"description": "d", "labels": LABELS}, {}, "missing or empty 'name'"),
    ({"name": "t", "description": "d", "labels": LABELS, "lables": []}, {}, "unknown key 'lables'"),
    ({"name": "t", "description": "d", "labels": LABELS, "seed_examples": "missing.csv"}, {}, "cannot read"),
    ({"name": "t", "description": "d", "labels": LABELS, "seed_examples": "seeds.txt"}, {"seeds.txt": "x"},
     "unknown seed file format"),
    ({"name": "t", "description": "d", "labels": LABELS, "seed_examples": "seeds.csv"},
     {"seeds.csv": "message,label\nhi,ham\n"}, r"no column 'text' \(columns: message, label\)"),
    ({"name": "t", "description": "d", "labels": LABELS,
      "seed_examples": {"path": "seeds.csv", "text_field": "message", "label_field": "topic"}},
     {"seeds.csv": "message,topic\nhi,greeting\nbuy now,advert\n"}, "all 2 seed rows are unusable"),
    ({"name": "t", "description": "d", "labels": LABELS, "examples": {"text": "hi"}}, {}, "'examples' must be a list"),
    ("name: [unclosed", {}, "not valid YAML"),
    (["a", "list"], {}, "expected a mapping"),
])
def test_structural_problems_raise_naming_file_and_field(tmp_path, document, files, message):
    path = _write(tmp_path, document, files=files)
    with pytest.raises(TaskSpecError, match=message) as error:
        load_task_spec(path)
    assert str(tmp_path) in str(error.value)


def test_unknown_spec_format_is_an_error(tmp_path):
    with pytest.raises(TaskSpecError, match="unknown task spec format"):
        load_task_spec(_write(tmp_path, "name = 't'", name="task.toml"))


# --- Config and plan --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"task_spec": ""}, "task_spec"),
    ({"examples_per_label": -1}, "examples_per_label"),
    ({"examples_per_request": 0}, "examples_per_request"),
    ({"examples_per_request": 21}, "examples_per_request"),
    ({"max_seeds_per_label": -1}, "max_seeds_per_label"),
    ({"max_edit_ratio": 0.0}, "max_edit_ratio"),
    ({"temperature": -0.1}, "temperature"),
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
    spec = load_task_spec(_write(tmp_path, document))
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
    assert edit_ratio("I love it", "I LOVE it!") == 0.0
    assert edit_ratio("I love it", "I hate it") == pytest.approx(1 / 3)
    assert edit_ratio("a b c", "x y z w") == 1.0
    assert edit_ratio("", "") == 0.0


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


# --- The PTransform ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_stage_writes_valid_rows_and_accounts_for_every_unit():
    """The scripted LLM's answers are known (tests/scripted_classification_llm.py), so every outcome is too."""
    config = _config(seeds_per_prompt=2)
    spec = load_task_spec(TASK_YAML)
    planned = spec.seed_rows_read + len(plan_units(spec, config))
    expected_reasons = {"unknown_label": 1, "llm_failed": 2, "copies_example": 2, "empty_text": 1, "surplus": 1,
                        "conflicting_labels": 2, "duplicate": 3, "unchanged": 1, "not_minimal": 1}

    def check(elements):
        kept = [row for kind, row in elements if kind == "kept"]
        rejected = [row for kind, row in elements if kind == "rejected"]
        tallies = {value[0][2]: value[1] for kind, value in elements if kind == "tally"}
        validate_rows(kept, CLASSIFICATION_EXAMPLE, source="kept")
        validate_rows(rejected, REJECTED, source="rejected")
        assert collections.Counter(row["reason"] for row in rejected) == expected_reasons
        assert collections.Counter(row["origin"] for row in kept) == {"seed": 12, "generated": 2, "counterfactual": 7}
        seeds = {row["example_id"]: row for row in kept if row["origin"] == "seed"}
        for row in kept:
            if row["origin"] == "counterfactual":
                seed = seeds[row["counterfactual_of"]]
                assert row["original_label"] == seed["label"] != row["label"]
                assert row["text"] != seed["text"]
        assert len({row["example_id"] for row in kept}) == len(kept)
        assert len({" ".join(row["text"].lower().split()) for row in kept}) == len(kept)
        counts = {"stage": STAGE, "input": tallies["input"], "kept": tallies["kept"], "rejected": len(rejected),
                  "expanded": tallies.get("expanded", 0), "skipped": tallies.get("skipped", 0), "reasons": {}}
        assert (counts["input"], counts["kept"], counts["expanded"]) == (planned, len(kept), 7)
        assert stage_balances(counts), counts

    with TestPipeline() as pipeline:
        outputs = pipeline | GenerateCounterfactuals(config, LLM)
        tagged = (
            outputs["kept"] | "TagKept" >> beam.Map(lambda row: ("kept", row)),
            outputs["rejected"] | "TagRejected" >> beam.Map(lambda row: ("rejected", row)),
            outputs["tallies"] | "TagTallies" >> beam.Map(lambda tally: ("tally", tally)),
        ) | beam.Flatten()
        assert_that(tagged, check)
        assert_that(outputs["answers"] | beam.combiners.Count.Globally(), equal_to([15]), label="OneAnswerPerRequest")


def test_a_broken_spec_fails_when_the_pipeline_is_built(tmp_path):
    path = _write(tmp_path, {"name": "t", "description": "d", "labels": LABELS[:1]})
    pipeline = TestPipeline()
    with pytest.raises(TaskSpecError, match="at least 2 labels"):
        _ = pipeline | GenerateCounterfactuals(_config(task_spec=path), LLM)
