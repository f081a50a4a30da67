from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that

from data_schemas import PASSAGE, REJECTED, validate_rows
from pipelines.json_lines import parse_json_line
from pipelines.stages.corpus_files import BUILTIN_STDLIB, CorpusError, CorpusFile, plan_corpus
from pipelines.stages.document_splitting import split_document
from pipelines.stages.read_corpus import (
    STAGE,
    Location,
    ReadCorpus,
    ReadCorpusConfig,
    RowOutcome,
    _FirstOccurrenceFn,
    _KeepFn,
    _ReadFileFn,
    count_tokens,
    passage_from_json_line,
    passage_from_record,
    read_corpus_file,
    sample_key,
    split_first_occurrence,
    text_document_passages,
    truncate_to_tokens,
)
from pipelines.stdlib_corpus import MIN_WORDS, build_stdlib_corpus, stdlib_records
from tests.dofn_lifecycle import run_dofn
from tests.test_document_splitting import DOC

HERE = Location("corpus.jsonl", 7)


def _line(record) -> bytes:
    return json.dumps(record).encode() + b"\n"


def _parse(raw: bytes) -> RowOutcome:
    return passage_from_json_line(parse_json_line(HERE.number, raw), HERE)


def _write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


# --- pure functions: one JSONL line / record ------------------------------------------------------------------------


def test_a_good_line_becomes_a_passage_row():
    outcome = _parse(_line({"id": 42, "title": " JSON ", "text": "  Parse JSON text.  ", "x": 1}))
    assert outcome.rejected is None
    assert outcome.passage == {"passage_id": "42", "title": "JSON", "text": "Parse JSON text.",
                               "source": "corpus.jsonl:7", "truncated": False}
    validate_rows([outcome.passage], PASSAGE)


@pytest.mark.parametrize("raw, reason, detail", [
    (_line({"text": "no id"}), "missing_id", 'missing "id"'),
    (_line({"id": "  ", "text": "blank id"}), "missing_id", 'missing "id"'),
    (_line({"id": [1], "text": "list id"}), "missing_id", "must be a string or an integer, got list"),
    (_line({"id": True, "text": "bool id"}), "missing_id", "got bool"),
    (_line({"id": "a"}), "missing_text", 'missing "text"'),
    (_line({"id": "a", "text": None}), "missing_text", 'missing "text"'),
    (_line({"id": "a", "text": {"nested": 1}}), "missing_text", "must be a string, got dict"),
    (_line({"id": "a", "text": " \n\t "}), "empty_text", '"text" is empty'),
    (b'{"id": "a", "text": "caf\xe9"}\n', "invalid_utf8", "not valid UTF-8 (byte 24: 0xe9)"),
    (b'{"id": "a", "text": \n', "invalid_json", "not valid JSON"),
    (b"{'id': 'a'}\n", "invalid_json", "not valid JSON"),
    (b"[1, 2]\n", "not_an_object", "got list"),
    (b'"just a string"\n', "not_an_object", "got str"),
    (b"17\n", "not_an_object", "got int"),
])
def test_a_bad_line_is_rejected_with_its_reason_and_place(raw, reason, detail):
    outcome = _parse(raw)
    assert outcome.passage is None
    assert outcome.reason == reason
    assert outcome.rejected["detail"].startswith("corpus.jsonl line 7: ")
    assert detail in outcome.rejected["detail"]
    validate_rows([outcome.rejected], REJECTED)


def test_invalid_utf8_keeps_the_raw_bytes():
    raw = b'{"id": "a", "text": "\xff\xfe broken"}'
    outcome = _parse(raw + b"\r\n")
    assert outcome.reason == "invalid_utf8"
    assert json.loads(outcome.rejected["payload"])["raw_bytes"].encode("latin-1") == raw
    assert outcome.rejected["record_id"] == "corpus.jsonl:7"


def test_rejections_of_identified_records_carry_the_id_and_the_whole_record():
    outcome = passage_from_record({"doc": "d1", "body": "", "extra": [1, 2]}, HERE, id_field="doc", text_field="body")
    assert outcome.reason == "empty_text"
    assert outcome.rejected["record_id"] == "d1"
    assert json.loads(outcome.rejected["payload"]) == {"doc": "d1", "body": "", "extra": [1, 2]}


# --- pure functions: tokens and truncation --------------------------------------------------------------------------


def test_tokens_are_words_and_punctuation():
    assert count_tokens("Hello, world! it's 3.14") == 10  # it ' s 3 . 14
    assert count_tokens("") == 0


def test_truncation_cuts_at_the_token_budget_and_keeps_inner_whitespace():
    text = "one two,\nthree four five"
    assert truncate_to_tokens(text, 6) == (text, False)  # exactly the budget: untouched
    cut, truncated = truncate_to_tokens(text, 4)
    assert (cut, truncated) == ("one two,\nthree", True)
    assert count_tokens(cut) == 4


def test_overlong_passages_are_truncated_and_flagged():
    outcome = passage_from_record({"id": "long", "text": "word " * 700}, HERE, max_tokens=512)
    assert outcome.passage["truncated"] is True
    assert count_tokens(outcome.passage["text"]) == 512


# --- pure functions: .txt / .md documents (splitting itself: test_document_splitting.py) ----------------------------

def test_text_document_passages_have_path_ids_and_sources():
    outcomes = text_document_passages(b"\xef\xbb\xbf# T\n\nalpha\n\n# U\n\nbeta", "/c/docs/a.md", "docs/a.md")
    rows = [outcome.passage for outcome in outcomes]
    validate_rows(rows, PASSAGE)
    assert [(r["passage_id"], r["title"], r["text"], r["source"]) for r in rows] == [
        ("docs/a.md#0", "T", "T\n\nalpha", "/c/docs/a.md:1"),
        ("docs/a.md#1", "T", "U\n\nbeta", "/c/docs/a.md:5"),
    ]
    assert text_document_passages(b"  \n\n", "/c/e.txt", "e.txt") == []


def test_a_document_that_is_not_utf8_is_one_rejection():
    [outcome] = text_document_passages(b"fine\n\ncaf\xe9\n", "/c/a.txt", "a.txt")
    assert outcome.reason == "invalid_utf8"
    assert outcome.rejected["detail"].startswith("/c/a.txt line 3: not valid UTF-8")


# --- pure functions: dedup, sampling (finding the files: test_corpus_files.py) ------------------------------------


def test_a_path_that_matches_nothing_fails_when_the_pipeline_is_built(tmp_path):
    with pytest.raises(CorpusError, match="matches no files"), TestPipeline() as pipeline:
        _ = pipeline | ReadCorpus(ReadCorpusConfig(path=str(tmp_path / "absent.jsonl")))


def test_the_first_occurrence_wins_by_file_then_line():
    rows = {order: {"passage_id": "p", "source": f"{order[0]}:{order[1]}"} for order in
            [("b.jsonl", 0), ("a.jsonl", 5), ("a.jsonl", 2)]}
    first, duplicates = split_first_occurrence("p", list(rows.items()))
    assert first["source"] == "a.jsonl:2"
    assert [d["detail"] for d in duplicates] == ["duplicate id 'p' at a.jsonl:5, first seen at a.jsonl:2",
                                                 "duplicate id 'p' at b.jsonl:0, first seen at a.jsonl:2"]
    assert {d["reason"] for d in duplicates} == {"duplicate_id"}


def test_sample_keys_are_stable_and_seeded():
    assert sample_key(0, "json.dumps") == sample_key(0, "json.dumps")
    assert sample_key(0, "json.dumps") != sample_key(1, "json.dumps")
    # A fixed value: the key must never depend on the process (Python's hash() is salted per process).
    assert sample_key(0, "a")[0] == int.from_bytes(__import__("hashlib").sha256(b"0\x00a").digest()[:8], "big")


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("passage_words", 0), ("sample", 0), ("path", "")])
def test_impossible_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field if field != "path" else "path must name"):
        ReadCorpusConfig(**{field: value})


# --- the DoFn, called directly --------------------------------------------------------------------------------------


def test_read_file_fn_yields_rows_tags_rejections_and_counts_the_rows_read(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [_line({"id": "a", "text": "t"}), b"\n", b"oops\n"])
    outputs = run_dofn(_ReadFileFn(ReadCorpusConfig(path=str(path))), [CorpusFile(str(path), "jsonl", "c.jsonl")])
    assert outputs.main == [("a", ((str(path), 0), {"passage_id": "a", "title": None, "text": "t",
                                                     "source": f"{path}:1", "truncated": False}))]
    assert outputs.reasons() == ["invalid_json"] and list(outputs.tagged) == ["rejected"]
    # Two rows read: the blank line 2 is not a row. (Kept and rejected rows are counted as they leave the stage.)
    assert outputs.tallies == {("stage", STAGE, "input"): 2}


def test_first_occurrence_fn_keeps_the_first_copy_of_an_id_and_tags_the_others_duplicate_id():
    def occurrence(path: str, index: int) -> tuple[tuple[str, int], dict]:
        return (path, index), {"passage_id": "p", "title": None, "text": f"{path} {index}", "source": f"{path}:{index}",
                               "truncated": False}

    outputs = run_dofn(_FirstOccurrenceFn(), [("p", [occurrence("b", 0), occurrence("a", 3), occurrence("a", 1)])])
    assert [row["source"] for row in outputs.main] == ["a:1"]
    assert [(row["record_id"], row["reason"]) for row in outputs.tagged["rejected"]] == [("p", "duplicate_id")] * 2


def test_keep_fn_samples_out_the_passages_keyed_above_the_threshold():
    rows = [{"passage_id": passage_id, "truncated": False} for passage_id in ("a", "b", "c", "d")]
    threshold = sorted(sample_key(7, row["passage_id"]) for row in rows)[1]  # the two smallest keys stay
    outputs = run_dofn(_KeepFn(7, sampling=True), rows, threshold)
    kept = sorted(rows, key=lambda row: sample_key(7, row["passage_id"]))[:2]
    assert sorted(row["passage_id"] for row in outputs.main) == sorted(row["passage_id"] for row in kept)
    assert len(outputs.tagged["sampled_out"]) == 2
    assert run_dofn(_KeepFn(7, sampling=False), rows).main == rows  # no sample: every unique passage is kept


# --- the PTransform on TestPipeline ---------------------------------------------------------------------------------
# A TestPipeline costs about a second on its own, so the format cases share one pipeline (each with its own ReadCorpus
# and one assert_that whose message names the case) and the sampling cases another.

OUTPUTS = ("kept", "rejected", "tallies", "sampled_out")


@dataclass(frozen=True)
class Case:
    """One ReadCorpus application and what it must output. `kept` maps id -> title (or lists ids when `titles` is
    False); rows_read must equal kept + rejected + sampled_out, which the constructor checks."""

    config: ReadCorpusConfig
    kept: dict[str, str | None] | tuple[str, ...]
    reasons: tuple[str, ...] = ()
    rows_read: int = 0
    sampled_out: int = 0
    #: Further checks over {output name: elements}; raise BeamAssertException.
    extra: Callable[[dict[str, list]], None] | None = None

    def __post_init__(self) -> None:
        assert self.rows_read == len(self.kept) + len(self.reasons) + self.sampled_out, "expectation does not balance"


def _outputs_match(name: str, case: Case):
    def check(tagged):
        by_name: dict[str, list] = {output: [] for output in OUTPUTS}
        for output, element in tagged:
            by_name[output].append(element)
        try:
            validate_rows(by_name["kept"], PASSAGE, source=f"{name} kept")
            validate_rows(by_name["sampled_out"], PASSAGE, source=f"{name} sampled_out")
            validate_rows(by_name["rejected"], REJECTED, source=f"{name} rejected")
        except ValueError as error:
            raise BeamAssertException(str(error)) from error
        titles = isinstance(case.kept, dict)
        actual = {
            "kept": sorted((r["passage_id"], r["title"]) if titles else r["passage_id"] for r in by_name["kept"]),
            "reasons": sorted(row["reason"] for row in by_name["rejected"]),
            "rows_read": sum(count for key, count in by_name["tallies"] if key == ("stage", STAGE, "input")),
            "sampled_out": len(by_name["sampled_out"]),
        }
        expected = {
            "kept": sorted(case.kept.items() if titles else case.kept),
            "reasons": sorted(case.reasons),
            "rows_read": case.rows_read,
            "sampled_out": case.sampled_out,
        }
        if actual != expected:
            raise BeamAssertException(f"case {name}: expected {expected}, got {actual}")
        if case.extra is not None:
            case.extra(by_name)
    return check


def _run_cases(cases: dict[str, Case]) -> None:
    with TestPipeline() as pipeline:
        for name, case in cases.items():
            outputs = pipeline | f"Read_{name}" >> ReadCorpus(case.config)
            tagged = [outputs[output] | f"Tag_{name}_{output}" >> beam.Map(lambda element, o=output: (o, element))
                      for output in OUTPUTS] | f"All_{name}" >> beam.Flatten()
            assert_that(tagged, _outputs_match(name, case), label=f"Check_{name}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise BeamAssertException(message)


def _jsonl_case(root: Path) -> Case:
    _write_jsonl(root / "a.jsonl", [_line({"doc_id": "d1", "body": "first passage", "name": "One"}),
                                    _line({"doc_id": 2, "body": "second passage"})])
    (root / "b.jsonl.gz").write_bytes(gzip.compress(_line({"doc_id": "d3", "body": "third", "name": "Three"})))
    config = ReadCorpusConfig(path=str(root / "*.jsonl*"), id_field="doc_id", text_field="body", title_field="name")
    return Case(config, {"d1": "One", "2": None, "d3": "Three"}, rows_read=3)


def _parquet_case(root: Path) -> Case:
    root.mkdir()
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["alpha", "beta", "  "], "title": ["A", None, "C"],
                             "embedding": [[0.1], [0.2], [0.3]]}), root / "part-0.parquet", row_group_size=2)
    # An empty shard, as WriteToParquet with num_shards can leave.
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}),
                   root / "part-1.parquet")
    detail = f'{root}/part-0.parquet row 2: "text" is empty'
    return Case(ReadCorpusConfig(path=str(root / "*.parquet")), {"1": "A", "2": None}, ("empty_text",), rows_read=3,
                extra=lambda out: _check([r["detail"] for r in out["rejected"]] == [detail], str(out["rejected"])))


def _beir_case(root: Path) -> Case:
    _write_jsonl(root / "corpus.jsonl", [_line({"_id": "d1", "title": "T1", "text": "one"}),
                                         _line({"_id": "d2", "title": "", "text": "two"})])
    _write_jsonl(root / "queries.jsonl", [_line({"_id": "q1", "text": "a query, not a passage"})])
    return Case(ReadCorpusConfig(path=str(root)), {"d1": "T1", "d2": None}, rows_read=2)


def _saved_dataset_case(root: Path) -> Case:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"id": ["s1", "s2", "s3"], "text": ["uno", "dos", None], "title": ["U", "D", "T"],
                                "label": [0, 1, 0]}).save_to_disk(str(root))
    return Case(ReadCorpusConfig(path=str(root)), {"s1": "U", "s2": "D"}, ("missing_text",), rows_read=3)


def _text_folder_case(root: Path) -> Case:
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "guide.md").write_text(DOC)
    (root / "notes.txt").write_text("plain notes\n\nsecond paragraph\n")
    (root / "empty.txt").write_text("")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.md").write_text("hidden, not read")
    guide = len(split_document(DOC, 200))
    return Case(ReadCorpusConfig(path=str(root)),
                {**{f"docs/guide.md#{i}": "Guide" for i in range(guide)}, "notes.txt#0": "notes"}, rows_read=guide + 1)


def _empty_files_case(root: Path) -> Case:
    _write_jsonl(root / "a.jsonl", [])
    _write_jsonl(root / "b.jsonl", [b"\n", b"\n"])
    return Case(ReadCorpusConfig(path=str(root / "*.jsonl")), (), rows_read=0)


@pytest.mark.slow
def test_every_format_on_the_pipeline(tmp_path):
    _run_cases({
        "jsonl": _jsonl_case(tmp_path / "jsonl"),
        "parquet": _parquet_case(tmp_path / "parquet"),
        "beir": _beir_case(tmp_path / "beir"),
        "save_to_disk": _saved_dataset_case(tmp_path / "saved"),
        "text": _text_folder_case(tmp_path / "text"),
        "empty": _empty_files_case(tmp_path / "empty"),
    })


def test_rejections_across_files_balance(tmp_path):
    # a.jsonl sorts first, so its "dup" is the one kept even though b.jsonl lists it on an earlier line.
    _write_jsonl(tmp_path / "b.jsonl", [_line({"id": "dup", "text": "second copy"}), b"\n",
                                        b'{"id": "bad", "text": "\xc3\x28"}\n', _line({"id": "e", "text": ""})])
    _write_jsonl(tmp_path / "a.jsonl", [_line({"id": "ok", "text": "fine"}), _line({"id": "x", "text": "y"}),
                                        _line({"id": "dup", "text": "first copy"}), _line({"id": "x", "text": "z"})])
    first_occurrences = [("dup", "first copy", f"{tmp_path}/a.jsonl:3"), ("ok", "fine", f"{tmp_path}/a.jsonl:1"),
                         ("x", "y", f"{tmp_path}/a.jsonl:2")]
    _run_cases({"rejections": Case(
        ReadCorpusConfig(path=str(tmp_path)), ("ok", "x", "dup"),
        ("duplicate_id", "duplicate_id", "invalid_utf8", "empty_text"), rows_read=7,
        extra=lambda out: _check(
            sorted((r["passage_id"], r["text"], r["source"]) for r in out["kept"]) == first_occurrences,
            f"not the first occurrences: {out['kept']}"),
    )})


@pytest.mark.slow
def test_sampling_is_exact_deterministic_and_after_dedup(tmp_path, stdlib):
    ids = [f"p{i}" for i in range(40)]
    _write_jsonl(tmp_path / "a.jsonl", [_line({"id": i, "text": f"text {i}"}) for i in ids[:25]])
    # Duplicates are removed before sampling: the copy of p0 is a rejection, never a sampled-out row.
    _write_jsonl(tmp_path / "b.jsonl", [_line({"id": i, "text": f"text {i}"}) for i in ids[25:] + ["p0"]])
    expected = sorted(ids, key=lambda i: sample_key(7, i))[:10]
    assert sorted(ids, key=lambda i: sample_key(8, i))[:10] != expected, "the seed must change the sample"
    stdlib_expected = sorted((r["id"] for r in stdlib), key=lambda i: sample_key(0, i))[:25]
    _run_cases({
        "sample": Case(ReadCorpusConfig(path=str(tmp_path / "*.jsonl"), sample=10, seed=7), tuple(expected),
                       ("duplicate_id",), rows_read=41, sampled_out=30),
        "sample_over_size": Case(ReadCorpusConfig(path=str(tmp_path / "a.jsonl"), sample=100), tuple(ids[:25]),
                                 rows_read=25),
        "builtin_sample": Case(ReadCorpusConfig(sample=25), tuple(stdlib_expected), rows_read=len(stdlib),
                               sampled_out=len(stdlib) - 25),
    })


# --- the built-in stdlib corpus -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib() -> list[dict[str, str]]:
    return stdlib_records()


def test_the_stdlib_corpus_is_big_clean_and_deterministic(stdlib, tmp_path):
    assert len(stdlib) >= 300
    assert stdlib_records() == stdlib
    assert len({r["id"] for r in stdlib}) == len(stdlib) == len({r["text"] for r in stdlib})
    assert all(len(r["text"].split()) >= MIN_WORDS and r["title"] == r["id"] for r in stdlib)
    assert {"json", "json.dumps", "collections.Counter.most_common"} <= {r["id"] for r in stdlib}
    assert stdlib_records(max_passages=5) == stdlib[:5]
    path = tmp_path / "stdlib.jsonl"
    assert build_stdlib_corpus(str(path), max_passages=50) == 50
    assert [json.loads(line) for line in path.read_text().splitlines()] == stdlib[:50]


def test_builtin_and_materialized_stdlib_corpora_agree(stdlib, tmp_path):
    path = tmp_path / "stdlib.jsonl"
    build_stdlib_corpus(str(path))
    config = ReadCorpusConfig()
    assert config.path == BUILTIN_STDLIB
    [builtin] = plan_corpus(config.path)
    from_builtin = [o.passage for o in read_corpus_file(builtin, config)]
    from_file = [o.passage for o in read_corpus_file(CorpusFile(str(path), "jsonl", "stdlib.jsonl"), config)]
    assert from_builtin == [{**row, "source": row["source"].replace(str(path), BUILTIN_STDLIB)} for row in from_file]
    assert from_builtin[0]["source"] == f"{BUILTIN_STDLIB}:1"
    assert any(row["truncated"] for row in from_builtin)  # module docstrings run over 512 tokens
