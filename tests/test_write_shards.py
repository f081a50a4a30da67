"""WriteShards on TestPipeline: rows of every record kind land in shards that validate against their schema, the
stages' tallies become the manifest, a stage that does not balance is shown as such, and a kind without rows is
written as none."""

from __future__ import annotations

import json
import posixpath

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from data_schemas import SCHEMAS, SchemaError, load_manifest
from pipelines.run_layout import MANIFEST_NAME, read_kind, shard_paths
from pipelines.stages.write_shards import WriteShards, _ValidateFn, _WriteManifestFn
from tests.dofn_lifecycle import run_dofn
from tests.shard_factory import classification_rows, triplet_rows

STATIC = {"run_id": "r1", "created_at": "2026-11-30T00:00:00+00:00", "embforge_version": "0.1.0",
          "package_versions": {}, "models": {"llm": "m@1", "teacher": "t@1"}, "prompt_versions": {},
          "budget": {}, "config": {"note": "carried into the manifest as it is"}}
STAGES = ("read_corpus", "grade_relevance")


def passage_rows(count: int = 3) -> list[dict]:
    return [{"passage_id": f"p{index}", "title": None, "text": f"passage number {index}", "source": "corpus.jsonl",
             "truncated": False} for index in range(count)]


def graded_pair_rows(count: int = 2) -> list[dict]:
    return [{"pair_id": f"p{index}-0", "query_id": f"q{index}", "query": f"query {index}", "query_type": "question",
             "task": "Given a question, retrieve passages that answer it", "passage_id": f"p{index}",
             "passage": f"passage number {index}", "llm_model": "m@1", "prompt_version": "1", "llm_relevance": None,
             "llm_reason": None, "roundtrip_rank": 1} for index in range(count)]


def rejected_row(stage: str, reason: str, record_id: str) -> dict:
    return {"stage": stage, "reason": reason, "record_id": record_id, "payload": json.dumps({"id": record_id}),
            "raw_answer": None, "detail": None}


ROWS = {
    "passages": passage_rows(),
    "pairs": graded_pair_rows(),
    "triplets": triplet_rows(4),
    "classification": classification_rows(3),
    "rejected": [rejected_row("read_corpus", "duplicate_id", "p0"), rejected_row("grade_relevance", "llm_irrelevant",
                                                                                 "p2-0")],
}
#: Balanced: read_corpus 4 in = 3 kept + 1 rejected; grade_relevance 3 in = 2 kept + 1 rejected.
TALLIES = [
    (("stage", "read_corpus", "input"), 4), (("stage", "read_corpus", "kept"), 3),
    (("stage", "grade_relevance", "input"), 3), (("stage", "grade_relevance", "kept"), 2),
    (("reason", "read_corpus", "duplicate_id"), 1), (("reason", "grade_relevance", "llm_irrelevant"), 1),
    # Counted by several workers: the manifest holds the sums.
    (("llm", "grade_relevance", "calls"), 2), (("llm", "grade_relevance", "calls"), 1),
    (("llm", "grade_relevance", "cache_hits"), 4), (("cost", "grade_relevance"), 1500),
    (("cache", "llm_calls"), 3), (("mining", "false_negatives"), 5),
]


def _write(output: str, rows: dict[str, list[dict]], tallies: list, stages=STAGES) -> dict:
    with TestPipeline() as pipeline:
        pcollections = {kind: pipeline | f"Rows{kind}" >> beam.Create(kind_rows) for kind, kind_rows in rows.items()}
        {"rows": pcollections, "tallies": pipeline | "Tallies" >> beam.Create(tallies)} | WriteShards(
            output, STATIC, tuple(stages))
    return load_manifest(posixpath.join(output, MANIFEST_NAME))


@pytest.fixture(scope="module")
def balanced_run(tmp_path_factory) -> tuple[str, dict]:
    """(output folder, manifest) of one WriteShards run over ROWS and TALLIES."""
    output = str(tmp_path_factory.mktemp("write-shards") / "run")
    return output, _write(output, ROWS, TALLIES)


def test_rows_of_every_kind_land_in_shards_that_validate_and_the_manifest_lists_them(balanced_run):
    output, manifest = balanced_run
    for kind, rows in ROWS.items():
        # read_kind validates every shard against the kind's schema.
        table = read_kind(output, kind, SCHEMAS[kind])
        key = next(iter(rows[0]))
        assert sorted(table.column(key).to_pylist()) == sorted(row[key] for row in rows), kind
        assert manifest["outputs"][kind] == len(rows)
    written = sorted(posixpath.relpath(path, output) for kind in ROWS for path in shard_paths(output, kind))
    assert manifest["files"] == written
    assert all(path.split("/")[1].startswith("part-") and path.endswith(".parquet") for path in written)


def test_tallies_become_the_manifest(balanced_run):
    _, manifest = balanced_run
    assert {key: manifest[key] for key in STATIC} == STATIC
    assert manifest["stages"] == [
        {"stage": "read_corpus", "input": 4, "kept": 3, "expanded": 0, "skipped": 0, "rejected": 1,
         "reasons": {"duplicate_id": 1}},
        {"stage": "grade_relevance", "input": 3, "kept": 2, "expanded": 0, "skipped": 0, "rejected": 1,
         "reasons": {"llm_irrelevant": 1}},
    ]
    assert manifest["balanced"] is True
    assert manifest["llm_usage"] == [{"stage": "grade_relevance", "calls": 3, "cache_hits": 4, "skipped_by_budget": 0,
                                      "input_tokens": 0, "output_tokens": 0, "estimated_cost_usd": 0.0015}]
    assert manifest["estimated_cost_usd"] == pytest.approx(0.0015)
    assert manifest["cache"] == {"llm_calls": 3}
    assert manifest["mining"] == {"false_negatives": 5}


def test_a_stage_that_loses_rows_shows_balanced_false(tmp_path):
    # grade_relevance received 3 pairs but accounts for only 2 (1 kept, 1 rejected).
    tallies = [tally for tally in TALLIES if tally[0] != ("stage", "grade_relevance", "kept")]
    tallies.append((("stage", "grade_relevance", "kept"), 1))
    manifest = _write(str(tmp_path / "run"), ROWS, tallies)
    assert manifest["balanced"] is False
    assert [stage["stage"] for stage in manifest["stages"] if stage["input"] + stage["expanded"] !=
            stage["kept"] + stage["rejected"] + stage["skipped"]] == ["grade_relevance"]


def test_a_kind_without_rows_is_counted_as_zero_and_reads_as_empty(tmp_path):
    output = str(tmp_path / "run")
    rows = {**ROWS, "classification": [], "rejected": []}
    # Nothing rejected and no stage listed: the tallies of the kept rows only.
    manifest = _write(output, rows, [], stages=())
    assert manifest["outputs"]["classification"] == 0 and manifest["outputs"]["rejected"] == 0
    assert read_kind(output, "classification", SCHEMAS["classification"]).num_rows == 0
    assert read_kind(output, "rejected", SCHEMAS["rejected"]).num_rows == 0
    assert manifest["stages"] == [] and manifest["balanced"] is True
    assert read_kind(output, "triplets", SCHEMAS["triplets"]).num_rows == len(ROWS["triplets"])


def test_a_row_that_breaks_its_schema_fails_the_run_naming_the_kind(tmp_path):
    broken = {**ROWS, "pairs": [{**graded_pair_rows(1)[0], "roundtrip_rank": "first"}]}
    with pytest.raises(Exception, match=r"pairs output \(row 0 of this worker\)"):
        _write(str(tmp_path / "run"), broken, TALLIES)


# --- The DoFns, called directly ---------------------------------------------------------------------------------------


def test_validate_fn_passes_good_rows_on_and_names_the_kind_and_row_of_a_broken_one():
    good = graded_pair_rows(2)
    assert run_dofn(_ValidateFn("pairs"), good).main == good
    broken = {**good[0], "roundtrip_rank": "first"}
    # The row number counts this worker's rows across elements: the third row it saw.
    with pytest.raises(SchemaError, match=r"pairs output \(row 2 of this worker\)") as error:
        run_dofn(_ValidateFn("pairs"), [*good, broken])
    assert "roundtrip_rank" in str(error.value)


def test_write_manifest_fn_sums_the_tallies_and_lists_the_written_files_relative_to_the_output(tmp_path):
    output = str(tmp_path / "run")
    written = [posixpath.join(output, "pairs", "part-00000-of-00001.parquet")]
    outputs = run_dofn(_WriteManifestFn(output, STATIC, STAGES), [None], TALLIES, written)
    assert outputs.main == [posixpath.join(output, MANIFEST_NAME)]
    manifest = load_manifest(outputs.main[0])
    assert manifest["files"] == ["pairs/part-00000-of-00001.parquet"]
    assert manifest["llm_usage"][0]["calls"] == 3  # two workers' counts, summed
    assert [(stage["stage"], stage["input"], stage["kept"], stage["rejected"]) for stage in manifest["stages"]] == [
        ("read_corpus", 4, 3, 1), ("grade_relevance", 3, 2, 1)]
    assert manifest["balanced"] is True
