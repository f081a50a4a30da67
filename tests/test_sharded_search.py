"""The sharded exact search: pure functions, the block and search DoFns called directly, the PTransform on TestPipeline
(sharded == unsharded == brute force)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow

from pipelines.search_spill import (
    HASH_SPACE,
    QUERY_GROUP_SALT,
    SHARD_SALT,
    SpillFn,
    hash_range,
    part_of,
    read_spilled,
    routing_hash,
    vector_matrix,
)
from pipelines.sharded_search import (
    Hit,
    IndexSettings,
    MergeShardResults,
    SearchShards,
    ShardedTopK,
    _route_corpus,
    _route_queries,
    _SearchShardFn,
    build_shard_index,
    exact_scores,
    merge_shard_hits,
    merge_topk,
    num_shards_for,
    pack_vector,
    search_plan,
    search_shard,
    teacher_score,
    unpack_vector,
)


def normalized_vectors(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force_top_k(passage_ids: list[str], vectors: np.ndarray, query: np.ndarray, k: int) -> list[Hit]:
    """Reference top-k: every exact score, sorted by (score desc, passage_id)."""
    scores = (vectors.astype(np.float64) * query.astype(np.float64)).sum(axis=1)
    hits = (Hit(pid, float(score)) for score, pid in zip(scores, passage_ids, strict=True))
    return sorted(hits, key=lambda hit: (-hit.score, hit.passage_id))[:k]



def test_exact_scores_do_not_depend_on_what_a_pair_is_batched_with() -> None:
    rng = np.random.default_rng(0)
    passages, query = normalized_vectors(rng, 200, 33), normalized_vectors(rng, 1, 33)[0]
    whole = exact_scores(query, passages)
    assert np.array_equal(exact_scores(query, passages[17:18]), whole[17:18])
    picked = rng.integers(0, 200, size=(4, 9))
    assert np.array_equal(exact_scores(query[None, None, :], passages[picked]), whole[picked])
    assert teacher_score(query.tolist(), passages[5].tolist()) == whole[5]


def test_search_shard_matches_brute_force_even_when_ties_outnumber_the_fetch() -> None:
    rng = np.random.default_rng(1)
    vectors = normalized_vectors(rng, 300, 16)
    queries = normalized_vectors(rng, 5, 16)
    # 40 identical copies of the first query's nearest passage: more tied hits than k + slack, so faiss must refetch.
    vectors[100:140] = queries[0]
    ids = [f"p{index:04d}" for index in rng.permutation(300)]
    shard = build_shard_index(ids, vectors)
    for query, hits in zip(queries, search_shard(shard, queries, k=10), strict=True):
        assert hits == brute_force_top_k(ids, vectors, query, 10)
    # The tie is broken by passage_id, not by whichever copies faiss happened to return.
    tied = sorted(ids[100:140])[:10]
    assert [hit.passage_id for hit in search_shard(shard, queries[:1], k=10)[0]] == tied


def test_merged_shard_top_ks_equal_the_global_top_k_including_ties() -> None:
    rng = np.random.default_rng(2)
    vectors = normalized_vectors(rng, 500, 16)
    queries = normalized_vectors(rng, 20, 16)
    vectors[200:230] = vectors[7]  # exact ties spread over every shard
    ids = [f"p{index:04d}" for index in range(500)]
    k = 12
    unsharded = search_shard(build_shard_index(ids, vectors), queries, k)
    shard_of = rng.integers(0, 7, size=500)
    per_shard = []
    for shard in range(7):
        rows = np.flatnonzero(shard_of == shard)
        per_shard.append(search_shard(build_shard_index([ids[r] for r in rows], vectors[rows]), queries, k))
    for query_index, query in enumerate(queries):
        merged = merge_topk([results[query_index] for results in per_shard], k)
        assert merged == unsharded[query_index] == brute_force_top_k(ids, vectors, query, k)


def test_merge_topk_is_bounded_and_orders_ties_by_passage_id() -> None:
    merged = merge_topk([[Hit("b", 0.5), Hit("z", 0.2)], [Hit("a", 0.5), Hit("c", 0.9)], []], k=3)
    assert merged == [Hit("c", 0.9), Hit("a", 0.5), Hit("b", 0.5)]
    assert merge_topk([], k=3) == []


@pytest.mark.slow
def test_sharded_top_k_transform_equalsbrute_force_top_k() -> None:
    rng = np.random.default_rng(4)
    vectors, queries = normalized_vectors(rng, 300, 8), normalized_vectors(rng, 12, 8)
    ids = [f"p{index:03d}" for index in range(300)]
    expected = [(f"q{i}", brute_force_top_k(ids, vectors, query, 6)) for i, query in enumerate(queries)]
    with TestPipeline() as pipeline:
        hits = {
            "queries": pipeline | "Queries" >> beam.Create([(f"q{i}", q.tolist()) for i, q in enumerate(queries)]),
            "passages": pipeline | "Passages" >> beam.Create(
                [(pid, pack_vector(v)) for pid, v in zip(ids, vectors, strict=True)]
            ),
        } | ShardedTopK(6, shard_size=7, query_groups=2, faiss_threads=1)
        assert_that(hits, equal_to(expected))


def _spill(folder: Path, items: list[tuple[Any, ...]], kind: str, salt: str, columns: tuple[str, ...]) -> list[Any]:
    """What `SpillFn` writes of items arriving in one bundle: its `SpillFile`s."""
    spiller = SpillFn(str(folder), kind, salt, columns)
    spiller.start_bundle()
    files = [spilled for item in items for spilled in spiller.process(item, GlobalWindow())]
    return files + [value.value for value in spiller.finish_bundle()]


def _parts(files: list[Any], tag: str, plan: tuple[int, int], key: tuple[int, int]) -> list[Any]:
    """The parts of `files` routed to the (shard, group) `key`."""
    route = _route_queries if tag == "q" else lambda spilled, plan: _route_corpus(spilled, tag, plan)
    return [part for spilled in files for destination, part in route(spilled, plan) if destination == key]


def test_search_dofn_reads_its_shard_and_query_group_from_spill_files_and_searches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pipelines.search_spill.SPILL_BATCH_ROWS", 7)  # several batches per file
    rng = np.random.default_rng(3)
    vectors = normalized_vectors(rng, 50, 8)
    queries = normalized_vectors(rng, 3, 8)
    ids = [f"p{index:02d}" for index in range(50)]
    passage_files = (_spill(tmp_path, [(pid, pack_vector(v)) for pid, v in zip(ids[:20], vectors, strict=False)],
                            "passage", SHARD_SALT, ("vector",))
                     + _spill(tmp_path, [(pid, pack_vector(v)) for pid, v in zip(ids[20:], vectors[20:], strict=True)],
                              "passage", SHARD_SALT, ("vector",)))
    # "p03" has no text: the shard leaves it out.
    text_files = _spill(tmp_path, [(pid, f"text of {pid}") for pid in ids if pid != "p03"], "text", SHARD_SALT,
                        ("text",))
    query_files = _spill(tmp_path, [("pair0", pack_vector(queries[0]), "p07"), ("pair1", pack_vector(queries[1]), None),
                                    ("pair2", pack_vector(queries[2]), "not-here")], "query", QUERY_GROUP_SALT,
                         ("vector", "lookup"))
    with_text = [index for index, pid in enumerate(ids) if pid != "p03"]
    searchable_ids, searchable = [ids[index] for index in with_text], vectors[with_text]
    fn = _SearchShardFn(k=5, query_batch_size=2, faiss_threads=1, keep_embeddings=True, with_texts=True)
    fn.setup()
    plan = (1, 1)
    # A GroupByKey gives no order: query parts may come before the passage parts they are searched against.
    parts = (_parts(query_files, "q", plan, (0, 0)) + _parts(passage_files, "p", plan, (0, 0))
             + _parts(text_files, "t", plan, (0, 0)))
    output = dict(fn.process(((0, 0), parts)))
    assert sorted(output) == ["pair0", "pair1", "pair2"]
    for index, query in enumerate(queries):
        hits, _ = output[f"pair{index}"]
        expected = brute_force_top_k(searchable_ids, searchable, query, 5)
        assert [Hit(passage_id, score) for passage_id, _, score, _ in hits] == expected
        for passage_id, text, _, embedding in hits:
            assert text == f"text of {passage_id}"
            assert embedding == pack_vector(vectors[ids.index(passage_id)])
    # The positive's vector comes back from the shard that holds it, and only when the query asked for it.
    assert [output[pair][1] for pair in ("pair0", "pair1", "pair2")] == [pack_vector(vectors[7]), None, None]
    assert list(fn.process(((0, 0), _parts(query_files, "q", plan, (0, 0))))) == []  # a shard without passages


def test_each_shard_and_query_group_reads_exactly_its_hash_range_of_every_spill_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pipelines.search_spill.SPILL_BATCH_ROWS", 3)
    items = [(f"p{index}", [float(index), 1.0]) for index in range(40)]
    files = _spill(tmp_path, [(pid, pack_vector(v)) for pid, v in items], "passage", SHARD_SALT, ("vector",))
    assert [rows for _, _, rows in files[0].batches] == [3] * 13 + [1]
    plan = (4, 2)
    for group in range(2):
        received = []
        for shard in range(4):
            parts = _parts(files, "p", plan, (shard, group))
            # Only batches overlapping the shard's range are routed: about a quarter of them, not all.
            assert 0 < sum(len(batches) for _, _, batches, _, _ in parts) < len(files[0].batches)
            for _, path, batches, low, high in parts:
                table = read_spilled(path, batches, low, high)
                ids = table.column("id").to_pylist()
                assert {part_of(routing_hash(SHARD_SALT, passage_id), 4) for passage_id in ids} <= {shard}
                received += zip(ids, vector_matrix(table).tolist(), strict=True)
        assert sorted(received) == sorted(items)  # every passage once per query group

    query_files = _spill(tmp_path, [(f"q{index}", pack_vector([0.0, 1.0]), None) for index in range(4)], "query",
                         QUERY_GROUP_SALT, ("vector", "lookup"))
    per_shard = {shard: [part[1] for part in _parts(query_files, "q", (3, 1), (shard, 0))] for shard in range(3)}
    assert per_shard == {shard: [query_files[0].path] for shard in range(3)}  # every query to every shard


def test_routing_hashes_and_range_bounds_survive_beams_integer_coder() -> None:
    """Spill files and routed parts carry hashes and range bounds as ints, which Beam codes with VarIntCoder: it
    rejects 2**63 and above, so a 64-bit hash space failed every search (apache-beam 2.78)."""
    hashes = [routing_hash(salt, f"id{index}") for salt in (SHARD_SALT, QUERY_GROUP_SALT) for index in range(2000)]
    bounds = [bound for parts in (1, 2, 3, 7, 64) for part in range(parts) for bound in hash_range(part, parts)]
    coder = beam.coders.VarIntCoder()
    for value in hashes + bounds:
        assert coder.decode(coder.encode(value)) == value
    assert max(bounds) == HASH_SPACE and all(0 <= value < HASH_SPACE for value in hashes)
    assert max(hashes) > HASH_SPACE * 0.99 and min(hashes) < HASH_SPACE * 0.01  # the hashes span the whole space


def test_a_spill_file_is_written_per_bounded_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipelines.search_spill.SPILL_FILE_BYTES", 88)  # 8 rows of a 3-byte id and 2 float32
    files = _spill(tmp_path, [(f"p{index:02d}", pack_vector([float(index), 1.0])) for index in range(20)], "passage",
                   SHARD_SALT, ("vector",))
    assert [spilled.rows for spilled in files] == [8, 8, 4]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(Path(f.path).name for f in files)


def test_vectors_of_different_dimensions_name_the_odd_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="passage 'b' has dimension 3, passage 'a' 2"):
        _spill(tmp_path, [("a", pack_vector([1.0, 0.0])), ("b", pack_vector([1.0, 0.0, 0.0]))], "passage", SHARD_SALT,
               ("vector",))


def test_the_search_deletes_its_spill_files_once_every_shard_is_searched(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    vectors, queries = normalized_vectors(rng, 30, 4), normalized_vectors(rng, 3, 4)
    with TestPipeline() as pipeline:
        inputs = {
            "queries": pipeline | "Queries" >> beam.Create([(f"q{i}", (pack_vector(q), None)) for i, q in
                                                            enumerate(queries)]) | beam.MapTuple(
                lambda query_id, value: (query_id, *value)),
            "passages": pipeline | "Passages" >> beam.Create([(f"p{i}", pack_vector(v)) for i, v in
                                                              enumerate(vectors)]),
        }
        results = inputs | SearchShards(3, 10, 2, 8, 1, spill_root=str(tmp_path))
        assert_that(results | beam.Keys() | beam.combiners.Count.Globally(), equal_to([3 * 3]))  # 3 shards
    assert list(tmp_path.iterdir()) == []


def test_vectors_pack_to_float32_bytes_and_back() -> None:
    blob = pack_vector([0.5, -1.0, 2.0])
    assert len(blob) == 12
    assert unpack_vector(blob) == [0.5, -1.0, 2.0]


@pytest.mark.parametrize(("corpus_size", "shard_size", "shards"), [(0, 10, 1), (10, 10, 1), (11, 10, 2), (5, 1, 5)])
def test_num_shards_covers_the_corpus_with_at_least_one_shard(corpus_size: int, shard_size: int, shards: int) -> None:
    assert num_shards_for(corpus_size, shard_size) == shards


def test_merge_shard_hits_orders_as_merge_topk_and_passes_one_shard_through() -> None:
    first = [("b", "text b", 0.5, None), ("z", None, 0.2, None)]
    second = [("a", "text a", 0.5, b"\x00"), ("c", None, 0.9, None)]
    merged = merge_shard_hits([first, second], 3)
    assert [hit[0] for hit in merged] == [hit.passage_id for hit in merge_topk(
        [[Hit(h[0], h[2]) for h in first], [Hit(h[0], h[2]) for h in second]], 3)] == ["c", "a", "b"]
    assert merged[1] == ("a", "text a", 0.5, b"\x00")  # texts and embeddings travel with their hits
    assert merge_shard_hits([first], 3) is first


def test_merged_shard_results_keep_the_global_top_k_and_the_positive_any_shard_found() -> None:
    merge = MergeShardResults(2)
    shards = [([("b", "text b", 0.5, None), ("z", None, 0.2, None)], None),
              ([("a", "text a", 0.5, b"\x00"), ("c", None, 0.9, None)], b"positive"),
              ([("d", None, 0.1, None)], None)]
    accumulator = merge.create_accumulator()
    for shard in shards[:2]:
        accumulator = merge.add_input(accumulator, shard)
    # Lifted: part of the shards merged in one bundle, the rest in another.
    merged = merge.extract_output(merge.merge_accumulators([accumulator, merge.add_input(
        merge.create_accumulator(), shards[2])]))
    assert merged == ([("c", None, 0.9, None), ("a", "text a", 0.5, b"\x00")], b"positive")
    assert merge.extract_output(merge.create_accumulator()) == ([], None)


@pytest.mark.slow
def test_sharded_and_unsharded_searches_give_the_same_top_k() -> None:
    rng = np.random.default_rng(5)
    vectors, queries = normalized_vectors(rng, 200, 8), normalized_vectors(rng, 10, 8)
    vectors[50:70] = vectors[3]  # ties across shards: broken by passage_id either way
    ids = [f"p{index:03d}" for index in range(200)]
    with TestPipeline() as pipeline:
        inputs = {
            "queries": pipeline | "Queries" >> beam.Create([(f"q{i}", q.tolist()) for i, q in enumerate(queries)]),
            "passages": pipeline | "Passages" >> beam.Create([(pid, v.tolist()) for pid, v in zip(ids, vectors,
                                                                                                   strict=True)]),
        }
        unsharded = inputs | "Unsharded" >> ShardedTopK(9, shard_size=1000, faiss_threads=1)
        sharded = inputs | "Sharded" >> ShardedTopK(9, shard_size=13, query_groups=3, faiss_threads=1)
        joined = (
            {"unsharded": unsharded, "sharded": sharded}
            | beam.CoGroupByKey()
            | beam.MapTuple(lambda query_id, grouped: (query_id, grouped["unsharded"] == grouped["sharded"]))
        )
        assert_that(joined, equal_to([(f"q{i}", True) for i in range(10)]))


@pytest.mark.parametrize(("passages", "queries", "shard_size", "query_groups", "plan"), [
    (10, 5, None, None, (1, 1)),               # small: one search unit
    (99_999, 5_000, None, None, (1, 1)),
    (100_000, 10_000, None, None, (4, 1)),     # from 100k passages the search spreads over workers
    (1_000_000, 10_000, None, None, (16, 1)),  # at most 16 automatic shards...
    (40_000_000, 250_000, None, None, (40, 3)),  # ... and at most 1M passages a shard; a group per 100k queries
    (1_000, 10, 100, 2, (10, 2)),              # the config's values win
])
def test_the_search_plan_spreads_large_corpora_and_keeps_what_the_config_says(passages, queries, shard_size,
                                                                              query_groups, plan) -> None:
    assert search_plan(passages, queries, shard_size, query_groups) == plan


def test_an_approximate_index_plans_its_shards_as_large_as_allowed() -> None:
    assert search_plan(1_000_000, 10_000, approximate=True) == (1, 1)
    assert search_plan(2_500_000, 250_000, approximate=True) == (3, 3)


# --- approximate search -----------------------------------------------------------------------------------------------


def _clustered(rng: np.random.Generator, rows: int, dim: int, clusters: int) -> np.ndarray:
    centers = normalized_vectors(rng, clusters, dim)
    vectors = centers[rng.integers(0, clusters, size=rows)] + 0.3 * rng.standard_normal((rows, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("settings", [IndexSettings("IVF16,Flat", nprobe=16), IndexSettings("HNSW32,Flat",
                                                                                            ef_search=512)])
def test_an_approximate_index_searched_exhaustively_finds_the_exact_top_k(settings) -> None:
    rng = np.random.default_rng(6)
    vectors, queries = _clustered(rng, 1500, 24, 16), _clustered(rng, 30, 24, 16)
    ids = [f"p{index:04d}" for index in range(1500)]
    # Every list probed / a candidate list as large as the shard: nothing is missed, so the results are the exact ones
    # (scores and tie order included), which checks the approximate path's rescoring and ordering.
    assert search_shard(build_shard_index(ids, vectors, settings), queries, 10) == search_shard(
        build_shard_index(ids, vectors), queries, 10)


def test_an_approximate_index_misses_some_neighbours_and_scores_what_it_finds_exactly() -> None:
    rng = np.random.default_rng(7)
    vectors, queries = _clustered(rng, 2000, 24, 32), _clustered(rng, 50, 24, 32)
    ids = [f"p{index:04d}" for index in range(2000)]
    exact = search_shard(build_shard_index(ids, vectors), queries, 40)
    # One probed list of 64: a query near a list boundary misses neighbours, and a list may hold fewer than k passages.
    approximate = search_shard(build_shard_index(ids, vectors, IndexSettings("IVF64,Flat", nprobe=1)), queries, 40)
    found = sum(len({hit.passage_id for hit in a} & {hit.passage_id for hit in e})
                for a, e in zip(approximate, exact, strict=True))
    assert 0 < found < 40 * len(queries)
    assert any(len(hits) < 40 for hits in approximate)
    for query, hits in zip(queries, approximate, strict=True):
        assert hits == sorted(hits, key=lambda hit: (-hit.score, hit.passage_id))
        for hit in hits:
            assert hit.score == exact_scores(query, vectors[ids.index(hit.passage_id)])


def test_index_settings_are_checked_before_the_run_and_against_the_shard() -> None:
    assert IndexSettings().problems() == [] and IndexSettings("IVF64,Flat", nprobe=8).problems() == []
    assert "not a faiss index factory string" in IndexSettings("IVF64,Flta").problems()[0]
    assert "nprobe applies to an IVF index" in IndexSettings("HNSW32,Flat", nprobe=8).problems()[0]
    assert "ef_search applies to an HNSW index" in IndexSettings("Flat", ef_search=8).problems()[0]
    rng = np.random.default_rng(8)
    shard = build_shard_index([str(index) for index in range(50)], normalized_vectors(rng, 50, 8),
                              IndexSettings("IVF4096,Flat"))
    with pytest.raises(ValueError, match="mining index 'IVF4096,Flat' cannot be built over a shard of 50 passages"):
        search_shard(shard, normalized_vectors(rng, 1, 8), 5)
