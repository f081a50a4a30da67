"""Stage 5: mine hard negatives for each graded pair. Sharded exact faiss search, positive-aware filtering, optional LLM
scoring.

Input: a dict `{"pairs": ..., "passages": ..., "vectors": ...}` of three PCollections: `data_schemas.GRADED_PAIR`
rows, the corpus (PASSAGE rows) and the run's teacher vectors (EmbedTeacher's kept items). The stage joins each pair
with its query's vector; a pair whose query has no vector is rejected as `missing_embedding`. Passages are joined with
their vectors inside the search's shards (pipelines/sharded_search.py), so the corpus's vectors go to disk once and
never through a shuffle; a passage without a vector is left out of the search (EmbedTeacher rejected it).

Inside, the mining works on `queries`, `passage_texts` and `passage_vectors` (`_MineEmbedded`):

- `queries`: GRADED_PAIR rows, each extended with `query_embedding` (teacher vector, L2-normalized: `pack_vector`
  float32 bytes as `TeacherVectors` hands them out, or a list of floats) and
  optionally `positive_embedding` (absent or null: looked up from the corpus by the positive's passage_id). Fields
  read: `pair_id` (must be unique), `query_id`, `query`, `task`, `passage_id` and `passage` (the positive), plus the
  embeddings.
- `passage_texts`: (passage_id, text) with unique ids; `passage_vectors`: (passage_id, `pack_vector` bytes, as
  `TeacherVectors` hands them out), same teacher and dimension as the queries, normalized. Vectors of another
  dimension than the queries are a pipeline error (raised), not data.

Output: `{"kept": TRIPLET rows, "rejected": REJECTED rows, "answers": LLMAnswer, "tallies": tallies}` (see
`MineNegatives`). Every input query ends in exactly one of kept and rejected. Reasons: `missing_field` (a required
field is absent or empty), `missing_embedding` (no query_embedding, or no positive_embedding and the positive is not in
the corpus), `embedding_mismatch` (query and positive embeddings differ in dimension), `duplicate_pair_id` (every row
of a pair_id that occurs more than once: their searches cannot be told apart), `no_negatives` (fewer than
`min_negatives` candidates survived the filters; `detail` counts what each filter dropped), `positive_judged_irrelevant`
(LLM scoring graded the positive below `min_positive_grade` and found no better positive). Rejected payloads are the
GRADED_PAIR row without its embeddings: those are derived data that the embedding cache gives back at no cost, and they
would make up most of rejected/.

The steps, per query:

1. Exact top-k inner-product search (faiss `IndexFlatIP`) over the corpus, sharded (pipelines/sharded_search.py: exact,
   so a missed neighbour never makes a silently easier negative, and sharded and unsharded runs agree). `index` can
   name an approximate faiss index instead, for corpora where exact search costs too much.
2. The positive is dropped, and so is any candidate whose words equal the positive's (`text_matching.normalize`): a
   duplicate in the corpus is a false negative too.
3. Positive-aware threshold (NV-Retriever TopK-PercPos): candidates scoring above `max_negative_score_ratio` times the
   positive's teacher score are dropped and counted as false negatives.
4. Optional LLM scoring (Gecko) of the `llm_candidates` hardest survivors and of the positive, through `CallLLM`:
   relevance classification (prompt `negative_scoring`) and, where the backend gives log-probabilities, query
   likelihood log p(query | passage) (prompt `query_likelihood`), fused by reciprocal rank fusion. Candidates graded
   relevant are dropped; a candidate clearly better than the positive becomes the positive (relabel).
5. The `num_negatives` hardest survivors become the triplet's negatives, hardest first.

The search (pipelines/sharded_search.py) gathers passages and queries into blocks, pairs each corpus shard with each
query group, and hands out hits with their passage texts (and vectors, with `keep_embeddings`); a query that carries no
positive_embedding asks it for its positive's vector, which the shard holding it returns. The per-shard results are
merged per query by a combine (`MergeShardResults`, so k hits a query travel on, not k per shard), then joined with the
query rows by pair_id: no join of hits with the corpus afterwards.

How the LLM's grades decide (which candidates drop, when the positive is relabelled, what a failed answer means):
pipelines/stages/candidate_scoring.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import apache_beam as beam

from pipelines.accounting import TALLIES, CountingDoFn, CountRows, sum_tallies
from pipelines.clients.base import TaskType
from pipelines.llm_calls import CallLLM, LLMAnswer
from pipelines.model_access import ModelAccess, ModelIdentity
from pipelines.sharded_search import (
    DEFAULT_QUERY_BATCH_SIZE,
    EXACT_INDEX,
    IndexSettings,
    MergeShardResults,
    SearchShards,
    merge_shard_hits,
    pack_vector,
    teacher_score,
    unpack_vector,
    vector_dimension,
)
from pipelines.stages import rejected_row
from pipelines.stages.candidate_scoring import (
    LIKELIHOOD,
    RELEVANCE,
    LLMJudgement,
    build_llm_requests,
    decide_relabel,
    fuse_llm_scores,
    read_judgement,
)
from pipelines.stages.embed_teacher import TeacherVectors
from pipelines.text_matching import normalize

STAGE = "mine_negatives"

_EMBEDDING_FIELDS = ("query_embedding", "positive_embedding")
_REQUIRED_FIELDS = ("pair_id", "query_id", "query", "task", "passage_id", "passage")


@dataclass(frozen=True)
class MineNegativesConfig:
    #: Name of the teacher embedding model that produced the vectors; written to every triplet. Required by
    #: MineNegatives; the default is empty so run configs can fill it from the teacher spec.
    teacher_model: str = ""
    #: Nearest neighbours retrieved per query (the positive usually among them).
    k: int = 32
    #: Negatives kept per triplet, hardest first (NV-Retriever and Gecko train with a handful of hard negatives).
    num_negatives: int = 7
    #: Fewer surviving negatives than this rejects the query as `no_negatives`.
    min_negatives: int = 1
    #: Drop candidates scoring above this fraction of the positive's score: 0.95 is NV-Retriever's best setting.
    max_negative_score_ratio: float = 0.95
    #: Also drop candidates whose words equal the positive's (`text_matching.normalize`: case and punctuation ignored).
    drop_positive_text_duplicates: bool = True
    #: Passages per search shard; None lets `search_plan` (pipelines/sharded_search.py) choose from the corpus size:
    #: one shard up to 100k passages, then about 25k a shard (at most 16, at most 1M passages each) so the search
    #: spreads over workers.
    shard_size: int | None = None
    #: Query groups per shard: the search runs once per (shard, group), see the module docstring for the tradeoff;
    #: None: one per 100k queries.
    query_groups: int | None = None
    #: Queries per faiss search call inside a (shard, group): bounds the per-call result buffers (16k x 40 hits, 8 MB).
    #: Large on purpose: faiss runs its exact search as GEMMs over blocks of 4,096 queries, and 1,024 per call took 1.7x
    #: the time of 10k per call here (100k x 384 passages).
    query_batch_size: int = DEFAULT_QUERY_BATCH_SIZE
    #: faiss OpenMP threads per worker process; None keeps faiss's default (all cores).
    faiss_threads: int | None = None
    #: The index each shard searches: "Flat" is exact (the default: a missed neighbour is a silently easier negative,
    #: and exact results do not depend on the sharding); any other faiss index factory string ("IVF4096,Flat",
    #: "HNSW32,Flat", "IVF4096,PQ64") searches approximately, then rescores what it found exactly. Recall measured in
    #: benchmarks/ann_recall.py.
    index: str = EXACT_INDEX
    #: IVF lists searched per query (faiss `nprobe`; faiss's default is 1): more is slower and finds more.
    nprobe: int | None = None
    #: HNSW candidate list size at search time (faiss `efSearch`; faiss's default is 16).
    ef_search: int | None = None
    #: Write teacher embeddings into triplets (for embedding-matching distillation); False writes nulls.
    keep_embeddings: bool = True
    #: LLM scoring of candidates (Gecko). Off by default: it costs (llm_candidates + 1) calls per query per signal and
    #: needs a capable model (a tiny local LLM grades at chance, docs/design.md).
    llm_scoring: bool = False
    #: Add query likelihood (log p(query | passage)) to the LLM relevance grade; needs a backend with log-probabilities.
    query_likelihood: bool = False
    #: Hardest threshold survivors the LLM scores; only these can become negatives when LLM scoring is on.
    #: 10 = the 7 negatives kept plus slack for the ones the LLM drops.
    llm_candidates: int = 10
    #: LLM grade (0-3) from which a candidate counts as relevant and is dropped: 2 = "partially answers".
    llm_relevant_grade: int = 2
    #: Swap in a candidate the LLM finds clearly more relevant than the positive.
    relabel: bool = True
    #: A candidate needs at least this grade to become the positive: 3 = "fully answers".
    relabel_min_grade: int = 3
    #: A positive graded below this (and not replaced) is rejected: 1 rejects only "irrelevant"; 0 disables the check.
    min_positive_grade: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.k < 1:
            problems.append(f"k must be >= 1, got {self.k}")
        if not 1 <= self.num_negatives <= self.k - 1:
            problems.append(
                f"num_negatives must be in 1..k-1 = 1..{self.k - 1} (the positive is usually one of the k hits), "
                f"got {self.num_negatives}; raise k or lower num_negatives"
            )
        if not 0 <= self.min_negatives <= self.num_negatives:
            problems.append(f"min_negatives must be in 0..num_negatives = 0..{self.num_negatives}, "
                            f"got {self.min_negatives}")
        if not 0 < self.max_negative_score_ratio <= 1:
            problems.append(f"max_negative_score_ratio must be in (0, 1], got {self.max_negative_score_ratio}")
        for name in ("shard_size", "query_groups", "query_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if self.faiss_threads is not None and self.faiss_threads < 1:
            problems.append(f"faiss_threads must be None or >= 1, got {self.faiss_threads}")
        problems += self.index_settings.problems()
        if self.query_likelihood and not self.llm_scoring:
            problems.append("query_likelihood is part of LLM scoring: set llm_scoring=True too")
        if self.llm_scoring and not self.num_negatives <= self.llm_candidates <= self.k - 1:
            problems.append(
                f"llm_candidates must be in num_negatives..k-1 = {self.num_negatives}..{self.k - 1} "
                f"(only LLM-scored candidates become negatives), got {self.llm_candidates}"
            )
        if not 1 <= self.llm_relevant_grade <= 3:
            problems.append(f"llm_relevant_grade must be in 1..3, got {self.llm_relevant_grade}")
        if not self.llm_relevant_grade <= self.relabel_min_grade <= 3:
            problems.append(f"relabel_min_grade must be in llm_relevant_grade..3 = {self.llm_relevant_grade}..3 "
                            f"(a new positive must at least count as relevant), got {self.relabel_min_grade}")
        if not 0 <= self.min_positive_grade <= 3:
            problems.append(f"min_positive_grade must be in 0..3, got {self.min_positive_grade}")
        if problems:
            raise ValueError("MineNegativesConfig: " + "; ".join(problems))

    @property
    def index_settings(self) -> IndexSettings:
        return IndexSettings(self.index, self.nprobe, self.ef_search)


# --- Candidate selection ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A passage as a positive or negative candidate of one query."""

    passage_id: str
    text: str
    teacher_score: float
    #: float32 bytes (`pack_vector`); None when the run does not keep embeddings.
    embedding: bytes | None = None


@dataclass(frozen=True)
class CandidateSelection:
    positive_score: float
    #: Candidates scoring above this were dropped as false negatives.
    max_negative_score: float
    #: Survivors, hardest first.
    candidates: tuple[Candidate, ...]
    hits: int
    dropped_positive: int
    dropped_duplicates: tuple[str, ...]
    dropped_false_negatives: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"{self.hits} hits: {self.dropped_positive} the positive, {len(self.dropped_duplicates)} same text as the "
            f"positive, {len(self.dropped_false_negatives)} above {self.max_negative_score:.4f} (ratio x positive "
            f"score {self.positive_score:.4f}), {len(self.candidates)} left"
        )


def select_candidates(
    positive_id: str,
    positive_text: str,
    positive_score: float,
    hits: Iterable[Candidate],
    config: MineNegativesConfig,
) -> CandidateSelection:
    """Steps 2 and 3: drop the positive, its text duplicates and candidates above the positive-aware threshold."""
    ordered = sorted(hits, key=lambda candidate: (-candidate.teacher_score, candidate.passage_id))
    # ratio x score for a positive score; for a negative one, ratio x score would sit above the positive, so the margin
    # is taken from |score| instead (sentence-transformers' relative_margin does the same).
    max_score = positive_score - abs(positive_score) * (1.0 - config.max_negative_score_ratio)
    positive_key = normalize(positive_text)
    kept: list[Candidate] = []
    dropped_positive = 0
    duplicates: list[str] = []
    false_negatives: list[str] = []
    for candidate in ordered:
        if candidate.passage_id == positive_id:
            dropped_positive += 1
        elif config.drop_positive_text_duplicates and normalize(candidate.text) == positive_key:
            duplicates.append(candidate.passage_id)
        elif candidate.teacher_score > max_score:
            false_negatives.append(candidate.passage_id)
        else:
            kept.append(candidate)
    return CandidateSelection(
        positive_score=positive_score,
        max_negative_score=max_score,
        candidates=tuple(kept),
        hits=len(ordered),
        dropped_positive=dropped_positive,
        dropped_duplicates=tuple(duplicates),
        dropped_false_negatives=tuple(false_negatives),
    )


def positive_candidate(row: Mapping[str, Any], positive_score: float, config: MineNegativesConfig) -> Candidate:
    embedding = pack_vector(row["positive_embedding"]) if config.keep_embeddings else None
    return Candidate(row["passage_id"], row["passage"], positive_score, embedding)


# --- LLM scoring ------------------------------------------------------------------------------------------------------


# --- Outcomes ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MiningOutcome:
    """A query's result: a triplet, or a rejection reason; `counts` feed Beam metrics (name -> increment)."""

    triplet: dict[str, Any] | None
    reason: str | None = None
    detail: str | None = None
    raw_answer: str | None = None
    counts: tuple[tuple[str, int], ...] = ()


def build_triplet(
    row: Mapping[str, Any],
    positive: Candidate,
    negatives: Sequence[Candidate],
    llm_scores: Sequence[float] | None,
    *,
    relabeled: bool,
    config: MineNegativesConfig,
) -> dict[str, Any]:
    """A TRIPLET row. triplet_id is the pair_id: one triplet per graded pair."""
    keep = config.keep_embeddings
    negative_embeddings = None
    if keep and all(negative.embedding is not None for negative in negatives):
        negative_embeddings = [unpack_vector(negative.embedding) for negative in negatives]  # type: ignore[arg-type]
    return {
        "triplet_id": row["pair_id"],
        "task": row["task"],
        "query_id": row["query_id"],
        "query": row["query"],
        "positive_id": positive.passage_id,
        "positive": positive.text,
        "positive_relabeled": relabeled,
        "negative_ids": [negative.passage_id for negative in negatives],
        "negatives": [negative.text for negative in negatives],
        "positive_teacher_score": positive.teacher_score,
        "negative_teacher_scores": [negative.teacher_score for negative in negatives],
        "negative_llm_scores": list(llm_scores) if llm_scores is not None else None,
        "query_embedding": unpack_vector(pack_vector(row["query_embedding"])) if keep else None,
        "positive_embedding": unpack_vector(positive.embedding) if keep and positive.embedding is not None else None,
        "negative_embeddings": negative_embeddings,
        "teacher_model": config.teacher_model,
    }


def mine_without_llm(
    row: Mapping[str, Any], selection: CandidateSelection, config: MineNegativesConfig
) -> MiningOutcome:
    """Step 5 without LLM scoring: the `num_negatives` hardest survivors."""
    negatives = selection.candidates[: config.num_negatives]
    if len(negatives) < config.min_negatives:
        detail = f"{selection.describe()}; need at least {config.min_negatives}"
        return MiningOutcome(None, "no_negatives", detail)
    positive = positive_candidate(row, selection.positive_score, config)
    return MiningOutcome(build_triplet(row, positive, negatives, None, relabeled=False, config=config))


def judge_candidates(
    row: Mapping[str, Any],
    selection: CandidateSelection,
    judgements: Iterable[LLMJudgement],
    config: MineNegativesConfig,
) -> MiningOutcome:
    """Steps 4 and 5 with LLM scoring: fuse, relabel, drop what the LLM finds relevant, keep the hardest."""
    positive = positive_candidate(row, selection.positive_score, config)
    scored = selection.candidates[: config.llm_candidates]
    signals = (RELEVANCE, LIKELIHOOD) if config.query_likelihood else (RELEVANCE,)
    answers = {(judgement.passage_id, judgement.signal): judgement for judgement in judgements}

    complete: list[str] = []
    failed: list[LLMJudgement | None] = []
    for passage_id in (positive.passage_id, *(candidate.passage_id for candidate in scored)):
        found = [answers.get((passage_id, signal)) for signal in signals]
        bad = [judgement for judgement in found if judgement is None or not judgement.ok]
        if bad:
            failed.append(bad[0])
        else:
            complete.append(passage_id)
    grades = {pid: int(answers[(pid, RELEVANCE)].value) for pid in complete}  # type: ignore[arg-type]
    signal_scores: list[Mapping[str, float]] = [grades]
    if config.query_likelihood:
        signal_scores.append({pid: answers[(pid, LIKELIHOOD)].value for pid in complete})  # type: ignore[misc]
    fused = fuse_llm_scores(signal_scores)
    failed_raw = next((judgement.raw for judgement in failed if judgement is not None and judgement.raw), None)
    positive_failed = positive.passage_id not in grades
    failed_candidates = failed[1:] if positive_failed else failed  # the positive is judged first
    skipped = sum(1 for judgement in failed_candidates if judgement is not None and judgement.skipped)
    counts = {
        "positive_llm_failed": int(positive_failed),
        "dropped.llm_failed": len(failed_candidates) - skipped,
        "dropped.llm_skipped": skipped,
    }

    new_positive_id = None
    if config.relabel:
        teacher = {candidate.passage_id: candidate.teacher_score for candidate in scored}
        teacher[positive.passage_id] = positive.teacher_score
        new_positive_id = decide_relabel(
            positive.passage_id, grades, fused, teacher, min_grade=config.relabel_min_grade
        )
    if new_positive_id is None and not positive_failed and grades[positive.passage_id] < config.min_positive_grade:
        positive_raw = answers[(positive.passage_id, RELEVANCE)].raw
        detail = (f"the LLM graded the positive {grades[positive.passage_id]} (< min_positive_grade "
                  f"{config.min_positive_grade}) and no candidate qualified as a better positive")
        return MiningOutcome(None, "positive_judged_irrelevant", detail, positive_raw, tuple(counts.items()))
    if new_positive_id is not None:
        positive = next(candidate for candidate in scored if candidate.passage_id == new_positive_id)
        counts["relabeled"] = 1

    negatives: list[Candidate] = []
    llm_relevant = 0
    for candidate in scored:
        if candidate.passage_id == new_positive_id or candidate.passage_id not in grades:
            continue
        if grades[candidate.passage_id] >= config.llm_relevant_grade:
            llm_relevant += 1
        else:
            negatives.append(candidate)
    counts["dropped.llm_relevant"] = llm_relevant
    negatives = negatives[: config.num_negatives]
    if len(negatives) < config.min_negatives:
        detail = (
            f"{selection.describe()}; of the {len(scored)} LLM-scored: {llm_relevant} graded relevant "
            f"(>= {config.llm_relevant_grade}), {counts['dropped.llm_failed']} failed answers, {skipped} not "
            f"called (LLM budget spent)"
            f"{', 1 promoted to positive' if new_positive_id else ''}; need at least {config.min_negatives}"
        )
        return MiningOutcome(None, "no_negatives", detail, failed_raw, tuple(counts.items()))
    triplet = build_triplet(
        row,
        positive,
        negatives,
        [fused[candidate.passage_id] for candidate in negatives],
        relabeled=new_positive_id is not None,
        config=config,
    )
    return MiningOutcome(triplet, counts=tuple(counts.items()))


def rejected_payload(row: Mapping[str, Any]) -> dict[str, Any]:
    """The query row without its embeddings (derived data the embedding cache gives back for free)."""
    return {key: value for key, value in row.items() if key not in _EMBEDDING_FIELDS}


# --- DoFns ------------------------------------------------------------------------------------------------------------

_KEPT = "kept"
_REJECTED = "rejected"
_SEARCH = "search"
_PENDING = "pending"
_REQUESTS = "requests"
#: Tally kind of the manifest's "mining" section: (("mining", name), count).
_MINING = "mining"


def _missing_fields(row: Mapping[str, Any]) -> list[str]:
    return [name for name in _REQUIRED_FIELDS if row.get(name) is None or len(row[name]) == 0]


class _OutcomeFn(CountingDoFn):
    """Base of the DoFns that take queries: rejects, and counts statistics through the stage's tally."""

    def __init__(self, config: MineNegativesConfig):
        super().__init__(STAGE)
        self._config = config

    def _statistics(self, counts: Iterable[tuple[str, int]]) -> None:
        for name, value in counts:
            self.tally.statistic(_MINING, name, value)

    def _reject(self, row: Mapping[str, Any], reason: str, detail: str | None, raw_answer: str | None = None):
        return beam.pvalue.TaggedOutput(_REJECTED, rejected_row(
            STAGE, reason, rejected_payload(row), record_id=row.get("pair_id"), raw_answer=raw_answer, detail=detail,
        ))

    def _finish(self, row: Mapping[str, Any], outcome: MiningOutcome) -> Iterator[Any]:
        self._statistics(outcome.counts)
        if outcome.triplet is None:
            assert outcome.reason is not None
            yield self._reject(row, outcome.reason, outcome.detail, outcome.raw_answer)
            return
        negatives = len(outcome.triplet["negative_ids"])
        self._statistics([("negatives", negatives), ("short_triplets", int(negatives < self._config.num_negatives))])
        yield outcome.triplet


class _KeyQueriesFn(_OutcomeFn):
    """Checks a query row; emits it keyed by pair_id (embeddings as `pack_vector` bytes), and its search item: its
    vector, and its positive's passage_id when the row carries no positive_embedding (the search looks the vector up
    in the shard that holds it)."""

    def process(self, row: dict[str, Any]) -> Iterator[Any]:
        missing = _missing_fields(row)
        if missing:
            yield self._reject(row, "missing_field", f"query row lacks {', '.join(missing)} (empty or null)")
            return
        if row.get("query_embedding") is None or len(row["query_embedding"]) == 0:
            yield self._reject(row, "missing_embedding", "query row has no query_embedding")
            return
        pair_id = row["pair_id"]
        positive = row.get("positive_embedding")
        dimension = vector_dimension(row["query_embedding"])
        if positive is not None and vector_dimension(positive) != dimension:
            detail = (f"query_embedding has {dimension} dimensions, positive_embedding "
                      f"{vector_dimension(positive)}: both must come from the same teacher at the same dimension")
            yield self._reject(row, "embedding_mismatch", detail)
            return
        query_vector = pack_vector(row["query_embedding"])
        positive_vector = pack_vector(positive) if positive is not None and len(positive) > 0 else None
        # The embeddings travel to the join as float32 bytes: 4 bytes a component instead of a Python float object.
        yield pair_id, {**row, "query_embedding": query_vector, "positive_embedding": positive_vector}
        lookup = row["passage_id"] if positive_vector is None else None
        yield beam.pvalue.TaggedOutput(_SEARCH, (pair_id, query_vector, lookup))


class _SelectFn(_OutcomeFn):
    """Joins a query with its per-shard search results, merges them, applies steps 2-3, then finishes it (no LLM) or
    emits its LLM requests."""

    def __init__(self, config: MineNegativesConfig, llm: bool):
        super().__init__(config)
        self._llm = llm

    def process(self, element: tuple[str, Mapping[str, list[Any]]]) -> Iterator[Any]:
        pair_id, grouped = element
        rows, results = grouped["query"], grouped["results"]
        if len(rows) > 1:
            detail = f"{len(rows)} query rows share pair_id {pair_id!r}; pair_id must be unique"
            for row in rows:
                yield self._reject(row, "duplicate_pair_id", detail)
            return
        if not rows:
            # Search results exist only for queries that were keyed, so this does not happen.
            return
        row = rows[0]
        # A row without positive_embedding asked the search for it: only the shard that holds the positive returns it.
        found = (vector for _, vector in results if vector is not None)
        positive_vector = row["positive_embedding"] or next(found, None)
        if positive_vector is None:
            detail = f"no positive_embedding in the row, and the positive {row['passage_id']!r} is not in the corpus"
            yield self._reject(row, "missing_embedding", detail)
            return
        row = {
            **row,
            "query_embedding": unpack_vector(row["query_embedding"]),
            "positive_embedding": unpack_vector(positive_vector),
        }
        config = self._config
        positive_score = teacher_score(row["query_embedding"], row["positive_embedding"])
        hits = [Candidate(*hit) for hit in merge_shard_hits([shard_hits for shard_hits, _ in results], config.k)]
        selection = select_candidates(row["passage_id"], row["passage"], positive_score, hits, config)
        self._statistics([
            ("hits", selection.hits),
            ("dropped.positive", selection.dropped_positive),
            ("dropped.duplicate_text", len(selection.dropped_duplicates)),
            ("dropped.teacher_threshold", len(selection.dropped_false_negatives)),
        ])
        # Without LLM scoring, or with too few candidates for it to matter (the LLM only ever removes candidates).
        if not self._llm or len(selection.candidates) < config.min_negatives:
            yield from self._finish(row, mine_without_llm(row, selection, config))
            return
        yield beam.pvalue.TaggedOutput(_PENDING, (pair_id, (row, selection)))
        scored = [(candidate.passage_id, candidate.text) for candidate in selection.candidates[:config.llm_candidates]]
        for request in build_llm_requests(row, scored, query_likelihood=config.query_likelihood):
            yield beam.pvalue.TaggedOutput(_REQUESTS, request)


def _key_judgement(answer: LLMAnswer) -> tuple[str, LLMJudgement]:
    judgement = read_judgement(answer)
    return judgement.pair_id, judgement


class _JudgeFn(_OutcomeFn):
    """Joins a pending query with its LLM judgements and finishes it."""

    def process(self, element: tuple[str, Mapping[str, list[Any]]]) -> Iterator[Any]:
        _, grouped = element
        for row, selection in grouped["pending"]:
            yield from self._finish(row, judge_candidates(row, selection, grouped["judgements"], self._config))


# --- The transforms ---------------------------------------------------------------------------------------------------


class _MineEmbedded(beam.PTransform):
    """{"queries": graded pairs + embeddings, "passage_texts": (passage_id, text), "passage_vectors": (passage_id,
    vector)} -> kept / rejected / answers / statistics: the mining itself, once every query row carries its vectors
    (see the module docstring). The search joins passages with their vectors in each shard."""

    def __init__(self, config: MineNegativesConfig, llm: ModelAccess | None, spill_root: str | None = None):
        super().__init__()
        self._config = config
        self._llm = llm
        self._spill_root = spill_root

    def expand(self, inputs: Mapping[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        queries = inputs["queries"]
        config = self._config
        pipeline = queries.pipeline

        keyed = queries | "KeyQueries" >> beam.ParDo(_KeyQueriesFn(config)).with_outputs(
            _SEARCH, _REJECTED, TALLIES, main="rows"
        )
        # Passages enter the search with their texts, so hits come out with them: no join of hits with the corpus.
        shard_results = {
            "queries": keyed[_SEARCH], "passages": inputs["passage_vectors"], "texts": inputs["passage_texts"],
        } | "Search" >> SearchShards(
            config.k, config.shard_size, config.query_groups, config.query_batch_size, config.faiss_threads,
            keep_embeddings=config.keep_embeddings, stage=STAGE, index=config.index_settings,
            spill_root=self._spill_root,
        )
        selected = (
            {"query": keyed["rows"],
             "results": shard_results | "MergeShardResults" >> beam.CombinePerKey(MergeShardResults(config.k))}
            | "JoinQueriesWithHits" >> beam.CoGroupByKey()
            | "SelectCandidates" >> beam.ParDo(_SelectFn(config, llm=self._llm is not None)).with_outputs(
                _REJECTED, _PENDING, _REQUESTS, TALLIES, main=_KEPT
            )
        )
        kept = [selected[_KEPT]]
        rejected = [keyed[_REJECTED], selected[_REJECTED]]
        tallies = [keyed[TALLIES], selected[TALLIES]]
        if self._llm is not None:
            called = selected[_REQUESTS] | "ScoreCandidates" >> CallLLM(self._llm, STAGE)
            answers = called["answers"]
            judged = (
                {"pending": selected[_PENDING], "judgements": answers | "KeyJudgements" >> beam.Map(_key_judgement)}
                | "JoinJudgements" >> beam.CoGroupByKey()
                | "JudgeCandidates" >> beam.ParDo(_JudgeFn(config)).with_outputs(_REJECTED, TALLIES, main=_KEPT)
            )
            kept.append(judged[_KEPT])
            rejected.append(judged[_REJECTED])
            tallies += [called["tallies"], judged[TALLIES]]
        else:
            answers = pipeline | "NoAnswers" >> beam.Create([])
        return {
            "kept": tuple(kept) | "FlattenKept" >> beam.Flatten(),
            "rejected": tuple(rejected) | "FlattenRejected" >> beam.Flatten(),
            "answers": answers,
            "tallies": sum_tallies(tallies),
        }


def _attach_query_embedding(element: tuple[str, Mapping[str, list[Any]]]) -> Iterator[Any]:
    """A graded pair joined with its query's teacher vector; a pair whose query has none is rejected."""
    _, grouped = element
    vectors = list(grouped["vectors"])
    for pair in grouped["pairs"]:
        if not vectors:
            yield beam.pvalue.TaggedOutput(_REJECTED, rejected_row(
                STAGE, "missing_embedding", pair, record_id=pair["pair_id"],
                detail="the teacher embedding of this query failed (see embed_teacher rejections)"))
            continue
        yield {**pair, "query_embedding": vectors[0]}


class MineNegatives(beam.PTransform):
    """{"pairs": GRADED_PAIR rows, "passages": PASSAGE rows, "vectors": the run's teacher vectors} -> kept / rejected /
    answers / tallies.

    Outputs: "kept" TRIPLET rows; "rejected" REJECTED rows; "answers" the LLMAnswers of LLM scoring (empty without
    it); "tallies" the stage's rows, LLM usage and (("mining", name), count) statistics (names as the Beam
    counters: hits, dropped.positive, dropped.duplicate_text, dropped.teacher_threshold, dropped.llm_relevant,
    dropped.llm_failed, dropped.llm_skipped, positive_llm_failed, relabeled, negatives, short_triplets), summed.
    See the module docstring for the input contract, the sharded search and the LLM decisions. `llm` serves LLM
    scoring only. `teacher`, the identity of the model that made the vectors, is written to every triplet (unless
    `config.teacher_model` names it already). `spill_root`: where the search spills its vectors (None: see
    `sharded_search.SearchShards`).
    """

    def __init__(self, config: MineNegativesConfig, llm: ModelAccess | None = None,
                 teacher: ModelIdentity | None = None, spill_root: str | None = None):
        super().__init__()
        if teacher is not None and not config.teacher_model:
            config = replace(config, teacher_model=teacher.tag)
        if not config.teacher_model:
            raise ValueError("MineNegatives: config.teacher_model is empty; set it to the teacher embedder's name "
                             "(it is written to every triplet)")
        if config.llm_scoring and llm is None:
            raise ValueError("MineNegatives: llm_scoring=True needs an LLM (or set llm_scoring=False)")
        if config.query_likelihood and llm is not None and llm.spec.backend == "gemini":
            raise ValueError("MineNegatives: query_likelihood needs log-probabilities, which the Gemini backend does "
                             "not give; use backend='local' or set query_likelihood=False")
        self._config = config
        self._llm = llm if config.llm_scoring else None
        self._spill_root = spill_root

    def expand(self, inputs: Mapping[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        vectors = inputs["vectors"]
        entering = inputs["pairs"] | "CountInput" >> CountRows(STAGE, "input")
        queries = (
            {
                "pairs": entering["rows"] | "KeyPairs" >> beam.Map(lambda pair: (pair["pair_id"], pair)),
                "vectors": vectors | "QueryVectors" >> TeacherVectors(TaskType.RETRIEVAL_QUERY),
            }
            | "JoinQueryEmbeddings" >> beam.CoGroupByKey()
            | "AttachEmbeddings" >> beam.FlatMap(_attach_query_embedding).with_outputs(_REJECTED, main="queries")
        )
        # No join of passages with their vectors here: the search joins them inside each shard, so the corpus's
        # vectors never sit in a shuffle (a passage without a vector is left out of the search there).
        mined = {
            "queries": queries["queries"],
            "passage_texts": inputs["passages"] | "PassageTexts" >> beam.Map(lambda row: (row["passage_id"],
                                                                                         row["text"])),
            "passage_vectors": vectors | "PassageVectors" >> TeacherVectors(TaskType.RETRIEVAL_DOCUMENT),
        } | "Mine" >> _MineEmbedded(self._config, self._llm, self._spill_root)
        rejected = (queries[_REJECTED], mined["rejected"]) | "AllRejected" >> beam.Flatten()
        kept = mined["kept"] | "CountKept" >> CountRows(STAGE, "kept")
        rejected = rejected | "CountRejected" >> CountRows(STAGE, "rejected")
        tallies = (entering["tallies"], mined["tallies"], kept["tallies"], rejected["tallies"])
        return {"kept": kept["rows"], "rejected": rejected["rows"], "answers": mined["answers"],
                "tallies": sum_tallies(tallies, "StageTallies")}
