from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from data_schemas import REJECTED, SCHEMAS, UNGRADED_PAIR, stage_balances, validate_rows
from pipelines.clients.base import TaskType, Usage
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.config import GenerateConfig
from pipelines.config_loading import ConfigError
from pipelines.llm_calls import LLMAnswer, LLMRequest
from pipelines.model_access import ModelAccess
from pipelines.run import build_generate_pipeline, generate
from pipelines.run_layout import read_kind
from pipelines.stages.embed_teacher import EmbedTeacherConfig
from pipelines.stages.generate_queries import (
    GenerateQueries,
    GenerateQueriesConfig,
    _JudgeFn,
    _RequestsFn,
    build_requests,
    copies_first_sentence,
    copies_passage,
    copies_title,
    few_shot_queries,
    judge_answers,
    load_examples,
    query_types_for,
)
from pipelines.stages.grade_relevance import GradeRelevance, GradeRelevanceConfig
from pipelines.stages.mine_negatives import MineNegativesConfig
from pipelines.stages.read_corpus import ReadCorpusConfig
from prompts.query_generation import MAX_USER_EXAMPLES
from tests.dofn_lifecycle import run_dofn

SPEC = LLMSpec(backend="custom", model="tests.fakes.scripted_backends:query_writer")
PASSAGE = {"passage_id": "p1", "title": None, "text": "The json module encodes Python objects as JSON text.",
           "source": "x", "truncated": False}
EXAMPLES_FILE = Path(__file__).parent / "data" / "scifact_query_examples.jsonl"
GOLDEN = Path(__file__).parent / "golden" / "prompts"
UPDATE_GOLDEN = os.environ.get("EMBFORGE_UPDATE_GOLDEN") == "1"

# SciFact-like passages: the titles and first sentences the 135M model copies.
ORGANOIDS_TITLE = "Cerebral organoids"
MDS_TITLE = "Induction of myelodysplasia by myeloid-derived suppressor cells."
CORNEA = ("The cornea is an immune privileged tissue, and arginase is a key component. Arginase depletes L-arginine, "
          "which T cells need to proliferate.")
WHITE_MATTER = ("Alterations of the architecture of cerebral white matter in the developing human brain can affect "
                "cortical development and result in functional disabilities. Diffusion tensor imaging measures it.")


def _answer(slot: int, value: dict | None, raw: str = "", passage: dict = PASSAGE, candidate: int = 0) -> LLMAnswer:
    request = LLMRequest(request_id=f"{passage['passage_id']}::q{slot}" + (f"c{candidate}" if candidate else ""),
                         prompt_name="query_generation", prompt_version="1", messages=(),
                         context={"passage": passage, "slot": slot, "candidate": candidate, "query_type": "question"})
    return LLMAnswer(request, value is not None, value, raw, None if value else "invalid JSON", Usage())


def _query(slot: int, query: str, passage: dict = PASSAGE, candidate: int = 0) -> LLMAnswer:
    return _answer(slot, {"task": "Given a question, retrieve", "query": query}, passage=passage, candidate=candidate)


def _reasons(answers, config: GenerateQueriesConfig | None = None, examples=None) -> list[tuple[str, str | None]]:
    outcomes = judge_answers(answers, config or GenerateQueriesConfig(), "m", examples)
    return [(outcome, row.get("reason")) for outcome, row in outcomes]


@pytest.mark.parametrize(("query", "copied"), [
    ("The json module encodes Python objects as JSON text.", True),  # the whole passage
    ("json module encodes Python objects as JSON", True),  # a verbatim stretch covering the query
    ("how do I turn a dict into JSON?", False),
    ("json encode", False),  # short keyword queries share words by nature
])
def test_copies_passage(query, copied):
    assert copies_passage(query, PASSAGE["text"], GenerateQueriesConfig()) is copied


# --- copies of the title ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "title", "copied"), [
    # copies
    ("cerebral organoids", ORGANOIDS_TITLE, True),  # the title itself
    ("  CEREBRAL   Organoids?! ", ORGANOIDS_TITLE, True),  # noisy case and punctuation
    ("Cerebral organoid", ORGANOIDS_TITLE, True),  # an inflection: only the trigram similarity sees it
    ("organoids, cerebral", ORGANOIDS_TITLE, True),  # reordered
    ("cerebral organoids review", ORGANOIDS_TITLE, True),  # the title plus one word (2/3 of the query)
    ("getmembers", "inspect.getmembers", True),  # half of the title's words and nothing else
    ("myelodysplasia induction by suppressor cells", MDS_TITLE, True),  # most of a long title, reordered
    # real queries about the title's topic
    ("what are cerebral organoids?", ORGANOIDS_TITLE, False),  # a question: the title is half of it
    ("how do cerebral organoids model microcephaly", ORGANOIDS_TITLE, False),
    ("myelodysplasia", MDS_TITLE, False),  # one topic word of a long title
    ("which cells drive age-related myelodysplasia", MDS_TITLE, False),
    ("DNA methylation in blood cells", "The DNA Methylome of Human Peripheral Blood Mononuclear Cells", False),
    # nothing to compare
    ("cerebral organoids", None, False),
    ("cerebral organoids", "", False),
    ("?!", ORGANOIDS_TITLE, False),
])
def test_copies_title(query, title, copied):
    assert copies_title(query, title) is copied


# --- near-copies of the first sentence --------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "passage", "copied"), [
    # copies
    ("the cornea is an immune privileged tissue and arginase is key", CORNEA, True),
    ("arginase is a key component of the immune privileged cornea", CORNEA, True),  # reworded: one new word in ten
    ("is the cornea an immune privileged tissue?", CORNEA, True),  # a clause turned into a question
    ("THE CORNEA, an immune-privileged tissue; arginase is KEY!!", CORNEA, True),  # noisy
    ("alterations of cerebral white matter architecture in the developing brain", WHITE_MATTER, True),
    # real queries
    ("why does the cornea tolerate foreign antigens?", CORNEA, False),
    ("Arginase activity protects corneal grafts from rejection.", CORNEA, False),
    ("how does white matter development affect the cortex?", WHITE_MATTER, False),
    ("cornea arginase immune tissue", CORNEA, False),  # four keywords: keyword queries pick passage words
    ("metformin type 2 diabetes", "Metformin is a first-line medication for type 2 diabetes. It lowers glucose.",
     False),  # the built-in keywords example: four words of its passage's first sentence
    ("arginase depletes L-arginine which T cells need", CORNEA, False),  # the second sentence, not the first
    ("", CORNEA, False),
])
def test_copies_first_sentence(query, passage, copied):
    assert copies_first_sentence(query, passage) is copied


def test_first_sentence_is_capped_so_an_unsplit_passage_is_not_compared_whole():
    passage = " ".join(f"w{index}" for index in range(200))  # no sentence end: one 200-word "sentence"
    assert not copies_first_sentence(" ".join(f"w{index}" for index in range(100, 106)), passage)
    assert copies_first_sentence(" ".join(f"w{index}" for index in range(6)), passage)


# --- how extractive a query is (the measure itself: test_text_matching.py) --------------------------------------------


def test_extractive_filter_is_off_by_default_and_rejects_above_the_threshold():
    answers = [_query(0, "json module encodes Python"), _query(1, "how do I turn a dict into text?")]
    assert _reasons(answers) == [("kept", None), ("kept", None)]
    config = GenerateQueriesConfig(max_extractive_share=0.5)
    assert _reasons(answers, config) == [("rejected", "extractive"), ("kept", None)]


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_extractive_threshold_must_be_a_share_below_one(value):
    with pytest.raises(ValueError, match="max_extractive_share must be in"):
        GenerateQueriesConfig(max_extractive_share=value)


# --- judging ----------------------------------------------------------------------------------------------------------


def test_query_types_rotate_deterministically():
    config = GenerateQueriesConfig(queries_per_passage=3, query_types=("question", "keywords", "claim"))
    types = query_types_for("p1", config)
    assert sorted(types) == ["claim", "keywords", "question"]
    assert types == query_types_for("p1", config)


def test_unknown_query_type_is_a_config_error():
    with pytest.raises(ValueError, match="query type 'haiku' is unknown"):
        GenerateQueriesConfig(query_types=("haiku",))


def test_judge_answers_keeps_good_and_rejects_each_failure_with_reason():
    example_query = few_shot_queries()[0]
    answers = [
        _query(0, "how do I serialize a dict?"),
        _answer(1, None, raw='{"task": "Giv'),
        _query(2, example_query.upper()),
        _query(3, PASSAGE["text"]),
        _query(4, "How do I serialize a dict"),
    ]
    outcomes = list(judge_answers(answers, GenerateQueriesConfig(), "m"))
    kinds = [(outcome, row.get("reason")) for outcome, row in outcomes]
    assert kinds == [("kept", None), ("rejected", "llm_failed"), ("rejected", "copies_example"),
                     ("rejected", "copies_passage"), ("rejected", "duplicate_query")]
    validate_rows([outcomes[0][1]], UNGRADED_PAIR)
    validate_rows([row for outcome, row in outcomes if outcome == "rejected"], REJECTED)
    assert outcomes[1][1]["raw_answer"] == '{"task": "Giv'


def test_judge_answers_rejects_title_and_first_sentence_copies():
    passage = {**PASSAGE, "passage_id": "cornea", "title": "Arginase and corneal immune privilege", "text": CORNEA}
    answers = [
        _query(0, "arginase and corneal immune privilege", passage),
        _query(1, "is the cornea an immune privileged tissue?", passage),
        _query(2, "why does the cornea tolerate foreign antigens?", passage),
    ]
    outcomes = list(judge_answers(answers, GenerateQueriesConfig(), "m"))
    assert [(outcome, row.get("reason")) for outcome, row in outcomes] == [
        ("rejected", "copies_title"), ("rejected", "copies_first_sentence"), ("kept", None)]
    validate_rows([row for outcome, row in outcomes if outcome == "rejected"], REJECTED)


def test_candidates_share_the_slots_query_id_and_are_judged_in_order():
    answers = [_query(0, "what does json encode?", candidate=2), _query(0, "how do I serialize a dict?"),
               _query(0, "how do I serialize a dict", candidate=1)]
    outcomes = list(judge_answers(answers, GenerateQueriesConfig(candidates=3), "m"))
    assert [(outcome, row.get("reason"), row.get("record_id") or row["pair_id"]) for outcome, row in outcomes] == [
        ("kept", None, "p1::q0"), ("rejected", "duplicate_query", "p1::q0c1"), ("kept", None, "p1::q0c2")]
    assert {row["query_id"] for outcome, row in outcomes if outcome == "kept"} == {"p1::q0"}


# --- candidates -------------------------------------------------------------------------------------------------------


def test_candidate_requests_keep_the_first_ones_id_and_cache_key_and_sample_the_rest_seeded():
    passage = {**PASSAGE, "title": "json"}
    single = build_requests(passage, GenerateQueriesConfig(queries_per_passage=2))
    several = build_requests(passage, GenerateQueriesConfig(queries_per_passage=2, candidates=3))
    assert [request.request_id for request in several] == [
        "p1::q0", "p1::q0c1", "p1::q0c2", "p1::q1", "p1::q1c1", "p1::q1c2"]
    firsts = [several[0], several[3]]
    assert [request.cache_key("m", "1") for request in firsts] == [request.cache_key("m", "1") for request in single]
    sampled = [request for request in several if request not in firsts]
    assert all(request.config.temperature == 0.7 for request in sampled)
    assert len({request.config.seed for request in sampled}) == len(sampled)
    again = build_requests(passage, GenerateQueriesConfig(queries_per_passage=2, candidates=3))
    assert [request.cache_key("m", "1") for request in again] == [request.cache_key("m", "1") for request in several]
    assert len({request.cache_key("m", "1") for request in several}) == len(several)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("candidates", 0, "candidates must be >= 1"),
    ("candidate_temperature", 0.0, "candidate_temperature must be > 0"),
])
def test_candidate_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        GenerateQueriesConfig(**{field: value})


CANDIDATE_PASSAGES = {
    # The writer's candidates (tests/fakes/scripted_backends.py): c0 extractive, sampled ones abstract (even seed) or
    # off-topic (odd seed, fails the round trip). The seeds of these ids give these mixes:
    "sort": "Sorting puts the items of a list in order.",  # c1 abstract, c2 off-topic
    "zip": "Zip files bundle many files into one archive.",  # c1 off-topic, c2 abstract
    "heap": "Heaps keep the smallest item first in a tree.",  # c1 and c2 off-topic
    "json": "Json encodes Python objects as text for the web.",  # c1 and c2 abstract
}


@pytest.mark.slow
def test_candidates_keep_the_least_extractive_one_that_passed_the_round_trip_and_balance():
    config = GenerateQueriesConfig(candidates=3)
    sampled = {request.request_id: "abstract" if request.config.seed % 2 == 0 else "off-topic"
               for pid, text in CANDIDATE_PASSAGES.items()
               for request in build_requests({**PASSAGE, "passage_id": pid, "text": text}, config)[1:]}
    assert sampled == {"sort::q0c1": "abstract", "sort::q0c2": "off-topic", "zip::q0c1": "off-topic",
                       "zip::q0c2": "abstract", "heap::q0c1": "off-topic", "heap::q0c2": "off-topic",
                       "json::q0c1": "abstract", "json::q0c2": "abstract"}, "the seeds changed: pick other ids"
    passages = [{**PASSAGE, "passage_id": pid, "text": text} for pid, text in CANDIDATE_PASSAGES.items()]
    spec = LLMSpec(backend="custom", model="tests.fakes.scripted_backends:candidate_writer")
    with TestPipeline() as pipeline:
        generated = pipeline | beam.Create(passages) | GenerateQueries(config, ModelAccess.llm(spec))
        # The teacher, scripted: a passage has a dimension of its own, and a query points along its passage's, except
        # an off-topic one, which points away: it ranks its passage last, outside the round trip's top 3 of 4.
        dimension = {passage_id: index for index, passage_id in enumerate(CANDIDATE_PASSAGES)}

        def along(passage_id: str, length: float = 1.0) -> list[float]:
            return [length if index == dimension[passage_id] else 0.0 for index in range(len(dimension))]

        passage_vectors = pipeline | "PassageVectors" >> beam.Create(
            [{"id": pid, "task_type": TaskType.RETRIEVAL_DOCUMENT.value, "embedding": along(pid)} for pid in dimension])
        query_vectors = generated["kept"] | "QueryVectors" >> beam.Map(
            lambda pair: {"id": pair["pair_id"], "task_type": TaskType.RETRIEVAL_QUERY.value,
                          "embedding": along(pair["passage_id"], -1.0 if "csv" in pair["query"] else 1.0)})
        vectors = (passage_vectors, query_vectors) | "Vectors" >> beam.Flatten()
        graded = {"pairs": generated["kept"], "vectors": vectors} | GradeRelevance(
            GradeRelevanceConfig(), select_candidates=True)
        assert_that(generated["rejected"] | "GenR" >> beam.Map(lambda row: (row["record_id"], row["reason"])),
                    equal_to([("heap::q0c2", "duplicate_query"), ("json::q0c2", "duplicate_query")]),
                    label="GenerationRejected")
        assert_that(graded["kept"] | "Kept" >> beam.Map(lambda row: (row["query_id"], row["pair_id"], row["query"])),
                    equal_to([("sort::q0", "sort::q0c1", "what is Sorting good for"),
                              ("zip::q0", "zip::q0c2", "what is Zip good for"),
                              ("heap::q0", "heap::q0", "do Heaps keep the smallest item or not"),
                              ("json::q0", "json::q0c1", "what is Json good for")]), label="Kept")
        assert_that(graded["rejected"] | "GradeR" >> beam.Map(lambda row: (row["record_id"], row["reason"])),
                    equal_to([("sort::q0", "surplus_candidate"), ("sort::q0c2", "roundtrip_failed"),
                              ("zip::q0", "surplus_candidate"), ("zip::q0c1", "roundtrip_failed"),
                              ("heap::q0c1", "roundtrip_failed"), ("json::q0", "surplus_candidate")]),
                    label="GradeRejected")
        # The balance run.py checks: generation fans each passage out to one row per candidate (expanded), and grading
        # accounts for every candidate generation kept.
        rows = ((generated["kept"], generated["rejected"]) | "GenRows" >> beam.Flatten()
                | "CountGen" >> beam.combiners.Count.Globally())
        expanded = len(passages) * (config.requests_per_passage - 1)
        assert_that(rows, equal_to([len(passages) + expanded]), label="GenerationBalance")
        graded_rows = ((graded["kept"], graded["rejected"]) | "GradeRows" >> beam.Flatten()
                       | "CountGrade" >> beam.combiners.Count.Globally())
        grading_input = generated["kept"] | "CountGradeInput" >> beam.combiners.Count.Globally()
        assert_that(graded_rows, equal_to([10]), label="GradingBalance")
        assert_that(grading_input, equal_to([10]), label="GradingInput")


@pytest.mark.slow
def test_a_run_with_candidates_balances_and_writes_one_pair_per_slot(tmp_path):
    """The whole generation pipeline (run.py's wiring): every candidate is counted, as expanded rows of query
    generation and as input of grading, and the pairs shard holds one query per slot."""
    corpus = tmp_path / "passages.jsonl"
    texts = {pid: f"{pid} " + text.split(" ", 1)[1] for pid, text in CANDIDATE_PASSAGES.items()}
    texts["csv"] = "csv files hold one table row per line of text."  # what the off-topic candidates find instead
    corpus.write_text("".join(json.dumps({"id": pid, "text": text}) + "\n" for pid, text in texts.items()))
    config = GenerateConfig(
        output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), corpus=ReadCorpusConfig(path=str(corpus)),
        llm=LLMSpec(backend="custom", model="tests.fakes.scripted_backends:candidate_writer"),
        teacher=EmbedderSpec(backend="custom", model="tests.fakes.backends:keyword_embedder"),
        embed=EmbedTeacherConfig(dimension=32), queries=GenerateQueriesConfig(candidates=3),
        grading=GradeRelevanceConfig(roundtrip_top_k=1), mining=MineNegativesConfig(k=4, num_negatives=2))
    manifest = generate(config)
    stages = {stage["stage"]: stage for stage in manifest["stages"]}
    assert all(stage_balances(stage) for stage in stages.values()), manifest["stages"]
    assert stages["generate_queries"]["expanded"] == len(texts) * 2
    assert stages["grade_relevance"]["input"] == stages["generate_queries"]["kept"]
    assert stages["grade_relevance"]["reasons"]["surplus_candidate"] >= 3
    pairs = read_kind(str(tmp_path / "run"), "pairs", SCHEMAS["pairs"]).to_pylist()
    assert sorted(row["query_id"] for row in pairs) == sorted(f"{pid}::q0" for pid in texts)
    assert {row["pair_id"] for row in pairs} >= {"sort::q0c1", "zip::q0c2", "heap::q0", "json::q0c1"}


@pytest.mark.slow
def test_pipeline_accounts_for_every_slot():
    passages = [
        {**PASSAGE, "passage_id": "a", "text": "Heaps keep the smallest item first."},
        {**PASSAGE, "passage_id": "b", "text": "This passage is BROKEN on purpose."},
        {**PASSAGE, "passage_id": "c", "text": "COPYME please copy this passage verbatim now"},
    ]
    config = GenerateQueriesConfig(queries_per_passage=2)
    with TestPipeline() as pipeline:
        outputs = pipeline | beam.Create(passages) | GenerateQueries(config, ModelAccess.llm(SPEC))
        assert_that(outputs["kept"] | beam.Map(lambda row: (row["passage_id"], row["query"])),
                    equal_to([("a", "what is first?")]), label="Kept")
        assert_that(outputs["rejected"] | "R" >> beam.Map(lambda row: (row["record_id"], row["reason"])),
                    equal_to([("a::q1", "duplicate_query"), ("b::q0", "llm_failed"), ("b::q1", "llm_failed"),
                              ("c::q0", "copies_passage"), ("c::q1", "copies_passage")]), label="Rejected")


# --- the user's own few-shot examples ---------------------------------------------------------------------------------


def _examples():
    return load_examples(str(EXAMPLES_FILE))


def _messages_text(messages) -> str:
    return "\n\n".join(f"=== {message.role} ===\n{message.content}" for message in messages) + "\n"


def test_user_examples_replace_the_built_in_ones_in_the_rendered_prompt():
    """Golden file: what the LLM sees for a SciFact passage when the user gave examples (regenerate with
    EMBFORGE_UPDATE_GOLDEN=1 and review the diff)."""
    passage = {**PASSAGE, "passage_id": "4983", "title": "Microstructural development of human newborn cerebral white "
               "matter", "text": WHITE_MATTER}
    config = GenerateQueriesConfig(query_types=("claim",))
    request = build_requests(passage, config, _examples())[0]
    rendered = _messages_text(request.messages)
    path = GOLDEN / "query_generation.user_examples.txt"
    if UPDATE_GOLDEN:
        path.write_text(rendered, encoding="utf-8")
    assert rendered == path.read_text(encoding="utf-8")
    # The two claims of the file are shown, and none of the built-in examples.
    assert "Statins lower the risk of heart attacks" in rendered and "Arginase activity helps protect" in rendered
    assert "caffeine" not in rendered.lower() and "Vitamin D supplements reduce" not in rendered


def test_user_examples_are_chosen_per_passage_type_first_and_deterministically():
    examples = _examples()
    config = GenerateQueriesConfig(query_types=("question",))

    def shown(passage_id: str, query_type: str = "question") -> tuple[str, ...]:
        passage = {**PASSAGE, "passage_id": passage_id}
        request = build_requests(passage, replace(config, query_types=(query_type,)), examples)[0]
        return tuple(message.content for message in request.messages if message.role == "assistant")

    choices = {shown(f"p{index}") for index in range(12)}
    assert len(choices) > 1, "every passage sees the same examples"
    assert all(len(choice) == 2 for choice in choices)
    assert shown("p3") == shown("p3")
    # Three of the file's examples are questions (one by default): a question request shows only questions.
    questions = {example.answer for example in examples if example.fields["query_type"] == "question"}
    assert all(set(choice) <= questions for choice in choices)
    # No keywords example in the file: the request still shows two of the others.
    assert len(shown("p1", "keywords")) == 2


def test_user_examples_change_the_prompt_version_and_cache_key(tmp_path):
    examples = _examples()
    edited_file = tmp_path / "examples.jsonl"
    edited_file.write_text(EXAMPLES_FILE.read_text().replace("heart attacks", "strokes"))
    edited = load_examples(str(edited_file))
    config = GenerateQueriesConfig(query_types=("claim",))
    built_in, mine, mine_again, theirs = (build_requests(PASSAGE, config, chosen)[0]
                                          for chosen in (None, examples, _examples(), edited))
    assert built_in.prompt_version == "1"
    assert mine.prompt_version.startswith("1+examples.") and mine.prompt_version != theirs.prompt_version
    assert mine.prompt_version == mine_again.prompt_version
    keys = [request.cache_key("m", "1") for request in (built_in, mine, mine_again, theirs)]
    assert keys[1] == keys[2] and len({keys[0], keys[1], keys[3]}) == 3


def test_copies_example_catches_a_copy_of_the_users_example():
    examples = _examples()
    answers = [_query(0, "does taking Vitamin D prevent cancer"), _query(1, "how do I serialize a dict?")]
    assert _reasons(answers, examples=examples) == [("rejected", "copies_example"), ("kept", None)]
    assert _reasons(answers) == [("kept", None), ("kept", None)]  # not a copy without the user's examples


def _bad_file(tmp_path, text: str) -> str:
    path = tmp_path / "examples.jsonl"
    path.write_text(text)
    return str(path)


GOOD_LINE = '{"passage": "Statins lower LDL cholesterol.", "query": "do statins reduce cholesterol?"}\n'


@pytest.mark.parametrize(("text", "message"), [
    (GOOD_LINE + '{"query": "q"}\n', "line 2: missing field 'passage'"),
    ('\n{"passage": "p"}\n', "line 2: missing field 'query'"),
    ('{"passage": "p", "query": "  "}\n', "line 1: field 'query' must be a non-empty string"),
    ('{"passage": "p", "query": "q", "query_type": "haiku"}\n', "line 1: field 'query_type' is 'haiku'"),
    ('{"passage": "p", "query": "q", "qurey": "q"}\n', "line 1: unknown field 'qurey'"),
    ('{"passage": "p", "query": "' + "word " * 70 + '"}\n', "line 1: field 'query': .*more than 64"),
    ("{not json\n", "line 1: not valid JSON \\(Expecting property name enclosed in double quotes at column 2\\)"),
    ('["p", "q"]\n', "line 1: expected a JSON object"),
    (GOOD_LINE * (MAX_USER_EXAMPLES + 1), f"line {MAX_USER_EXAMPLES + 1}: more than {MAX_USER_EXAMPLES} examples"),
    ("\n\n", "holds no examples"),
])
def test_a_bad_examples_file_is_one_config_error_naming_file_line_and_field(tmp_path, text, message):
    path = _bad_file(tmp_path, text)
    with pytest.raises(ConfigError, match=f"^generate.queries.examples: {path} {message}") as error:
        load_examples(path)
    assert "\n" not in str(error.value)


def test_a_missing_examples_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^generate.queries.examples: .*nope.jsonl: not found$"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_eight_examples_are_fine(tmp_path):
    assert len(load_examples(_bad_file(tmp_path, GOOD_LINE * MAX_USER_EXAMPLES))) == MAX_USER_EXAMPLES


def test_a_bad_examples_file_fails_while_the_pipeline_is_built(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "Heaps keep the smallest item first."}\n')
    config = GenerateConfig(output=str(tmp_path / "run"), corpus=ReadCorpusConfig(path=str(corpus)),
                            queries=GenerateQueriesConfig(examples=_bad_file(tmp_path, '{"query": "q"}\n')))
    with pytest.raises(ConfigError, match="examples.jsonl line 1: missing field 'passage'"):
        build_generate_pipeline(beam.Pipeline(), config)


# --- the DoFns, called directly -------------------------------------------------------------------------------------


def test_requests_fn_fans_a_passage_out_to_its_requests_and_counts_the_rest_as_expanded():
    config = GenerateQueriesConfig(candidates=2)
    outputs = run_dofn(_RequestsFn(config, None), [PASSAGE, {**PASSAGE, "passage_id": "p2"}])
    per_passage = len(build_requests(PASSAGE, config))
    assert per_passage > 1
    assert [request.request_id for request in outputs.main[:2]] == ["p1::q0", "p1::q0c1"]
    assert len(outputs.main) == 2 * per_passage and outputs.tagged == {}
    # One input row becomes per_passage rows: per_passage - 1 of them are fan-out, per passage.
    assert outputs.tallies == {("stage", "generate_queries", "expanded"): 2 * (per_passage - 1)}


def test_judge_fn_keeps_good_queries_and_tags_each_rejection_with_its_reason():
    answers = [_query(0, "how do I serialize a dict?"), _answer(1, None, raw='{"task": "Giv'),
               _query(2, PASSAGE["text"])]
    outputs = run_dofn(_JudgeFn(GenerateQueriesConfig(), "m", None), [("p1", answers)])
    assert [(row["query_id"], row["query"], row["llm_model"]) for row in outputs.main] == [
        ("p1::q0", "how do I serialize a dict?", "m")]
    assert outputs.reasons() == ["llm_failed", "copies_passage"]
    assert outputs.tagged["rejected"][0]["raw_answer"] == '{"task": "Giv'
    validate_rows(outputs.tagged["rejected"], REJECTED)
    assert outputs.tallies == {}  # kept and rejected rows are counted as they leave the stage (CountRows)
