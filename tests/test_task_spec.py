"""Reading a task spec and its seed rows (pipelines/stages/task_spec.py): what is an error, what is a rejected seed."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import yaml

from pipelines.stages.task_spec import TaskSpecError, load_task_spec

DATA = Path(__file__).parent / "data" / "counterfactuals"
TASK_YAML = str(DATA / "task.yaml")
TASK_JSON = str(DATA / "task_inline.json")
LABELS = [{"name": "spam", "description": "Unsolicited advertising"},
          {"name": "ham", "description": "A message the reader wants"}]


def write_spec(tmp_path: Path, document, *, name: str = "task.yaml",
               files: dict[str, str | bytes] | None = None) -> str:
    """The task spec `document` (or text) as `name` in `tmp_path`, next to `files` (seed files)."""
    for file_name, data in (files or {}).items():
        if isinstance(data, bytes):
            (tmp_path / file_name).write_bytes(data)
        else:
            (tmp_path / file_name).write_text(data, encoding="utf-8")
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else
                    (json.dumps(document) if name.endswith(".json") else yaml.safe_dump(document)), encoding="utf-8")
    return str(path)


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
    spec = load_task_spec(write_spec(tmp_path, document, files={"seeds.csv": reordered}))
    original = load_task_spec(TASK_YAML)
    assert {seed.seed_id: seed.text for seed in spec.seeds} == {seed.seed_id: seed.text for seed in original.seeds}


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
    path = write_spec(tmp_path, {"name": "t", "description": "d", "labels": LABELS, "seed_examples": "seeds.jsonl"},
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
    assert spec.rejected_seeds[0].payload == '{"text": "truncated'


def test_csv_rows_with_shifted_columns_are_malformed(tmp_path):
    seeds = "text,label\nWin a free cruise,spam\nLunch at noon, tomorrow?,ham\n\nSee you,ham\n"
    path = write_spec(tmp_path, {"name": "t", "description": "d", "labels": LABELS, "seed_examples": "seeds.csv"},
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
    spec = load_task_spec(write_spec(tmp_path, document))
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
    path = write_spec(tmp_path, document, files=files)
    with pytest.raises(TaskSpecError, match=message) as error:
        load_task_spec(path)
    assert str(tmp_path) in str(error.value)


def test_unknown_spec_format_is_an_error(tmp_path):
    with pytest.raises(TaskSpecError, match="unknown task spec format"):
        load_task_spec(write_spec(tmp_path, "name = 't'", name="task.toml"))


def test_jsonl_seeds_keep_line_separators_inside_strings_and_name_lines_that_are_not_utf8(tmp_path):
    """The seed file is read by the one JSON Lines reader: a BOM is dropped, U+2028 inside a string stays text, and a
    line that is not UTF-8 is one malformed row, not a broken spec."""
    seeds = ('\ufeff{"text": "Win a\u2028free cruise", "label": "spam"}\n'.encode()
             + b'{"text": "caf\xe9 at noon?", "label": "ham"}\n{"text": "Lunch at noon?", "label": "ham"}\n')
    path = write_spec(tmp_path, {"name": "t", "description": "d", "labels": LABELS, "seed_examples": "seeds.jsonl"},
                      files={"seeds.jsonl": seeds})
    spec = load_task_spec(path)
    assert [(seed.text, seed.location) for seed in spec.seeds] == [
        ("Win a\u2028free cruise", f"{tmp_path / 'seeds.jsonl'} line 1"),
        ("Lunch at noon?", f"{tmp_path / 'seeds.jsonl'} line 3")]
    [bad] = spec.rejected_seeds
    assert (bad.reason, bad.location) == ("malformed_row", f"{tmp_path / 'seeds.jsonl'} line 2")
    assert bad.detail.endswith("line 2: not valid UTF-8 (byte 13: 0xe9)")
