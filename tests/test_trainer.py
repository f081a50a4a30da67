"""Trainer tests: config validation, shard reading, the batch sampler and the losses (fast), then real training of the
packaged MiniLM on a synthetic run directory (slow): every loss term, exact resume, sentence-transformers loading, soup.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.io.filesystems import FileSystems
from safetensors.torch import load_file

from data_schemas import TRIPLET, SchemaError
from embedder.config import TrainConfig
from embedder.data import Batch, TaskBatchSampler, TrainingData, TripletExample, read_run
from embedder.losses import (
    EmbeddingMatching,
    global_orthogonal_regularization,
    in_batch_negative_mask,
    info_nce,
    label_classification,
    margin_mse,
    matryoshka,
    truncate,
)
from embedder.train import adamw, batch_losses, lr_multiplier, total_optimizer_steps
from pipelines.clients.base import TaskType
from pipelines.clients.task_prompts import PROMPT_NAMES, prompt_name
from tests.fakes.memory_filesystem import MemoryFileSystem
from tests.shard_factory import classification_rows, triplet_rows, write_run, write_shard

# ---- config ----------------------------------------------------------------------------------------------------------


def test_default_config_is_valid_and_pickles():
    config = TrainConfig().validate()
    assert pickle.loads(pickle.dumps(config)) == config
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(("changes", "message"), [
    ({"batch_size": 1}, "batch_size: 1"),
    ({"matryoshka_dims": (128, 256)}, "strictly descending"),
    ({"matryoshka_dims": (128, 128)}, "strictly descending"),
    ({"matryoshka_dims": (64, 0)}, "positive integer"),
    ({"projection_dim": 32, "matryoshka_dims": (64, 32)}, "larger than projection_dim 32"),
    ({"infonce_weight": 0.0, "distillation_weight": 0.0, "spread_out_weight": 0.0, "classification_weight": 0.0},
     "every loss weight is 0"),
    ({"spread_out_weight": -1.0}, "spread_out_weight: must be >= 0"),
    ({"margin_distillation_weight": -0.5}, "margin_distillation_weight: must be >= 0"),
    ({"precision": "fp8"}, "precision: 'fp8'"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"max_steps": 0}, "max_steps: 0"),
    ({"temperature": 0.0}, "temperature"),
    ({"task_prompts": {"SEARCH": "q: "}}, "unknown task types ['SEARCH']"),
    ({"task_types": {"my task": "SEARCH"}}, "task_types: unknown task types ['my task=SEARCH']"),
    ({"default_prompt_name": "query"}, "default_prompt_name"),
    ({"lr_schedule": "step"}, "lr_schedule"),
])
def test_config_rejects_impossible_values(changes, message):
    with pytest.raises(ValueError, match="invalid TrainConfig") as error:
        TrainConfig(**changes).validate()
    assert message in str(error.value)


def test_margin_distillation_alone_is_a_loss_to_train():
    only_margin = dict(infonce_weight=0.0, distillation_weight=0.0, spread_out_weight=0.0, classification_weight=0.0)
    assert TrainConfig().margin_distillation_weight == 0.0  # off by default
    assert TrainConfig(**only_margin, margin_distillation_weight=1.0).validate()


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as error:
        TrainConfig(batch_size=0, learning_rate=-1.0).validate()
    assert "batch_size" in str(error.value) and "learning_rate" in str(error.value)


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"'batchsize' \(did you mean 'batch_size'\?\)"):
        TrainConfig.from_dict({"batchsize": 8})
    config = TrainConfig.from_dict({"matryoshka_dims": [128, 64], "task_types": {"nli": "SEMANTIC_SIMILARITY"}})
    assert config.matryoshka_dims == (128, 64)
    assert config.query_task_type("nli", classification=False) == "SEMANTIC_SIMILARITY"
    assert config.query_task_type("other", classification=False) == "RETRIEVAL_QUERY"
    assert config.query_task_type("other", classification=True) == "CLASSIFICATION"


def test_epochs_set_the_number_of_optimizer_steps(run_dir):
    data = read_run(run_dir)
    sampler = TaskBatchSampler.for_data(data, batch_size=4, seed=0)
    batches = len(sampler.epoch_batches(0)) + len(sampler.epoch_batches(1))
    config = TrainConfig(batch_size=4, seed=0, epochs=2, grad_accumulation=2)
    assert total_optimizer_steps(config, sampler) == math.ceil(batches / 2)
    assert total_optimizer_steps(TrainConfig(max_steps=7), sampler) == 7


def test_lr_schedule_warms_up_then_decays():
    linear = [lr_multiplier(step, 10, 2, "linear") for step in range(10)]
    assert linear[:2] == [0.5, 1.0]
    assert all(later < earlier for earlier, later in zip(linear[1:], linear[2:], strict=False))
    assert linear[-1] > 0
    cosine = [lr_multiplier(step, 10, 0, "cosine") for step in range(10)]
    assert 0.95 < cosine[0] < 1.0 and 0 < cosine[-1] < 0.05
    assert all(later < earlier for earlier, later in zip(cosine, cosine[1:], strict=False))


def test_adamw_is_fused_on_cpu_and_matches_the_per_tensor_update():
    weights = [torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))) for seed in (0, 1)]
    copies = [torch.nn.Parameter(weight.detach().clone()) for weight in weights]
    fused = adamw([{"params": weights, "weight_decay": 0.01}], 1e-3)
    reference = torch.optim.AdamW([{"params": copies, "weight_decay": 0.01}], lr=1e-3, fused=False, foreach=False)
    assert fused.param_groups[0]["fused"]
    for _ in range(3):
        for optimizer, parameters in ((fused, weights), (reference, copies)):
            for parameter in parameters:
                parameter.grad = parameter.detach() ** 2
            optimizer.step()
    for weight, copy in zip(weights, copies, strict=True):
        torch.testing.assert_close(weight, copy)


# ---- data ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    return write_run(str(tmp_path_factory.mktemp("run")))


def test_read_run_reads_every_row_and_accepts_empty_shards(run_dir):
    data = read_run(run_dir)
    assert len(data.triplets) == 24 and len(data.classification) == 12
    assert data.counts["triplets_empty_shards"] == 1 and data.counts["classification_empty_shards"] == 1
    assert data.teacher_dim == 32
    assert data.triplets[0].negative_embeddings.shape == (2, 32)
    assert data.label_text("sentiment", "neutral").startswith("The text states facts")
    assert data.label_text("sentiment", "unseen") == "unseen"


def test_read_run_names_file_row_and_column_of_a_bad_shard(tmp_path):
    rows = triplet_rows(3)
    rows[2]["negative_embeddings"] = rows[2]["negative_embeddings"][:1]
    path = write_shard(str(tmp_path / "triplets" / "part-0.parquet"), rows, TRIPLET)
    with pytest.raises(SchemaError, match=r"part-0.parquet row 2, column 'negative_embeddings'"):
        read_run(str(tmp_path))
    # A type error the schema catches: a string where a list of negatives belongs.
    os.remove(path)
    table = pa.Table.from_pylist(triplet_rows(2)).set_column(
        TRIPLET.get_field_index("negatives"), "negatives", pa.array(["a", "b"]))
    pq.write_table(table, str(tmp_path / "triplets" / "part-1.parquet"))
    with pytest.raises(SchemaError, match=r"part-1.parquet row 0, column 'negatives'"):
        read_run(str(tmp_path))


def test_read_run_refuses_a_run_without_rows(tmp_path):
    write_shard(str(tmp_path / "triplets" / "empty.parquet"), [], TRIPLET)
    with pytest.raises(ValueError, match="no training rows"):
        read_run(str(tmp_path))


def test_reader_drops_negatives_that_repeat_the_positive(tmp_path):
    rows = triplet_rows(2)
    rows[0]["negatives"] = [rows[0]["positive"], rows[0]["negatives"][1]]
    write_run(str(tmp_path), triplets=rows, classification=[])
    data = read_run(str(tmp_path))
    assert data.triplets[0].negatives == (rows[0]["negatives"][1],)
    assert data.triplets[0].negative_embeddings.shape == (1, 32)
    assert data.counts["dropped_duplicate_negative"] == 1


def _texts(data) -> list[tuple[str, ...]]:
    return [example.texts for example in data.examples]


@pytest.mark.parametrize("seekable", [True, False], ids=["seekable", "forward_only"])
def test_read_run_reads_a_run_on_another_beam_filesystem(run_dir, memfs, monkeypatch, seekable):
    # memfs:// stands for gs:// and friends: shards are found and read through Beam's FileSystems, also when a
    # download cannot seek.
    monkeypatch.setattr(MemoryFileSystem, "seekable", seekable)
    remote = write_run(f"{memfs}/runs/one")
    # A dot-file is a temporary or tool file, as glob would skip it: never a shard.
    with FileSystems.create(f"{memfs}/runs/one/triplets/.part-00000.parquet.tmp.parquet") as handle:
        handle.write(b"half-written")
    data, local = read_run(remote), read_run(run_dir)
    assert _texts(data) == _texts(local) and len(data.triplets) == 24 and len(data.classification) == 12
    assert data.counts == local.counts and data.counts["triplets_empty_shards"] == 1
    assert data.teacher_dim == 32 and data.triplets[0].negative_embeddings.shape == (2, 32)
    assert data.label_descriptions == local.label_descriptions


def test_read_run_names_the_remote_file_row_and_column_of_a_bad_shard(memfs):
    rows = triplet_rows(3)
    rows[2]["negative_embeddings"] = rows[2]["negative_embeddings"][:1]
    write_shard(f"{memfs}/run/triplets/part-0.parquet", rows, TRIPLET)
    with pytest.raises(SchemaError, match=r"memfs://test/run/triplets/part-0.parquet row 2, column "
                                          r"'negative_embeddings'"):
        read_run(f"{memfs}/run")
    with FileSystems.create(f"{memfs}/run/triplets/part-0.parquet") as handle:
        handle.write(b"not parquet")
    with pytest.raises(SchemaError, match=r"memfs://test/run/triplets/part-0.parquet.*not a readable Parquet file"):
        read_run(f"{memfs}/run")
    write_shard(f"{memfs}/empty/triplets/part-0.parquet", [], TRIPLET)
    with pytest.raises(ValueError, match=r"memfs://test/empty: no training rows .* found 1 triplet"):
        read_run(f"{memfs}/empty")


# ---- sampler ---------------------------------------------------------------------------------------------------------


def test_batches_are_full_and_hold_one_task(run_dir):
    data = read_run(run_dir)
    examples = data.examples
    sampler = TaskBatchSampler.for_data(data, batch_size=4, seed=0)
    repeated = 0
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        seen = []
        for batch in batches:
            # 24 triplets (one query task type) and 12 classification examples: every batch is full.
            assert len(batch.indices) == 4, batch
            kinds = {type(examples[index]).__name__ for index in batch.indices}
            assert len(kinds) == 1
            if kinds == {"ClassificationExample"}:
                assert len({examples[index].task for index in batch.indices}) == 1
            texts = [text for index in batch.indices for text in examples[index].texts]
            repeated += len(texts) - len(set(texts))
            seen += batch.indices
        assert sorted(seen) == list(range(len(examples))), "every example exactly once per epoch"
    # The synthetic negatives repeat across rows, and the batches stay full all the same: the loss masks repeats.
    assert repeated > 0


def test_only_the_last_batch_of_a_task_is_short():
    tasks = [("triplet", "RETRIEVAL_QUERY")] * 10 + [("classification", "sentiment")] * 7 + [("triplet", "STS")] * 2
    sampler = TaskBatchSampler(tasks, batch_size=4, seed=1)
    for epoch in range(2):
        batches = sampler.epoch_batches(epoch)
        sizes = {task: sorted((len(batch.indices) for batch in batches if batch.task == task), reverse=True)
                 for task in set(tasks)}
        assert sizes == {("triplet", "RETRIEVAL_QUERY"): [4, 4, 2], ("classification", "sentiment"): [4, 3],
                         ("triplet", "STS"): [2]}
        assert all({tasks[index] for index in batch.indices} == {batch.task} for batch in batches)
        assert sorted(index for batch in batches for index in batch.indices) == list(range(len(tasks)))


def test_sampler_is_deterministic_and_resumes_exactly(run_dir):
    data = read_run(run_dir)
    first = TaskBatchSampler.for_data(data, batch_size=4, seed=7)
    again = TaskBatchSampler.for_data(data, batch_size=4, seed=7)
    other = TaskBatchSampler.for_data(data, batch_size=4, seed=8)
    assert first.epoch_batches(0) == again.epoch_batches(0)
    assert first.epoch_batches(0) != other.epoch_batches(0)
    assert first.epoch_batches(0) != first.epoch_batches(1)
    # Run past an epoch boundary, save the state, and continue in a new sampler.
    for _ in range(len(first) + 3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 1 and state["position"] == 3
    resumed = TaskBatchSampler.for_data(data, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(20)] == [first.next_batch() for _ in range(20)]
    with pytest.raises(ValueError, match="batch_size"):
        TaskBatchSampler.for_data(data, batch_size=5, seed=7).load_state_dict(state)
    # A state of the earlier duplicate-free sampler (no "policy") made other batches: refused, not resumed inexactly.
    with pytest.raises(ValueError, match="policy=duplicate-free"):
        TaskBatchSampler.for_data(data, batch_size=4, seed=7).load_state_dict(
            {key: value for key, value in state.items() if key != "policy"})


# ---- losses ----------------------------------------------------------------------------------------------------------


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_rewards_matching_pairs_and_counts_hard_negatives():
    queries = _unit(4, 16, 0)
    matched = info_nce(queries, queries.clone(), torch.zeros(0, 16), temperature=0.05)
    shuffled = info_nce(queries, queries.roll(1, dims=0), torch.zeros(0, 16), temperature=0.05)
    assert matched < 0.01 < shuffled
    # A hard negative as close as the positive takes half the probability mass: loss ~ log 2.
    with_copy = info_nce(queries, queries.clone(), queries[:1].clone(), temperature=0.05)
    assert with_copy > matched + math.log(2) / 4 - 1e-3


def _masked_reference(queries, candidates, kept: list[list[int]], temperature: float) -> torch.Tensor:
    """InfoNCE as if each query's left-out candidates were absent: query i's softmax over `kept[i]` only (its own
    positive, column i, among them)."""
    losses = []
    for query, columns in enumerate(kept):
        logits = queries[query] @ candidates[columns].T / temperature
        losses.append(torch.logsumexp(logits, dim=0) - logits[columns.index(query)])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("shared_by", ["id", "text"])
def test_info_nce_masks_a_shared_positive_as_if_it_were_absent(shared_by):
    # Queries 0 and 1 were written for the same passage: by id (the copies' texts differ, e.g. one truncated), or by
    # text alone (no id, or different ids). Each query's copy of the other's positive is no negative of it.
    if shared_by == "id":
        positives = [("p7", "passage seven"), ("p7", "passage seven, truncated"), ("p8", "passage eight")]
    else:
        positives = [("", "passage seven"), ("p99", "passage seven"), ("p8", "passage eight")]
    negatives = [("n1", "negative one"), ("n2", "negative two"), ("n3", "negative three")]
    mask = in_batch_negative_mask(positives, negatives)
    # Query 2 keeps passage seven as a negative, once: the second copy is a repeat.
    assert mask.masked.tolist() == [[False, True, False, False, False, False],
                                    [True, False, False, False, False, False],
                                    [False, True, False, False, False, False]]
    assert (mask.false_negatives, mask.repeats) == (2, 1)
    queries, documents = _unit(3, 16, 10), _unit(6, 16, 11)
    # The copy scores high against both queries, as a copy of their positive would.
    documents[1] = documents[0]
    masked = info_nce(queries, documents[:3], documents[3:], temperature=0.05, mask=mask.masked)
    absent = _masked_reference(queries, documents, [[0, 2, 3, 4, 5], [1, 2, 3, 4, 5], [0, 2, 3, 4, 5]], 0.05)
    torch.testing.assert_close(masked, absent)
    # Without the mask the copy is a negative, and the loss is another (higher) one.
    assert info_nce(queries, documents[:3], documents[3:], temperature=0.05) > masked + 0.1


def test_info_nce_masks_a_positive_mined_as_another_rows_negative_and_repeats():
    positives = [("p1", "passage one"), ("p2", "passage two")]
    # Row 1's hard negatives: passage one (query 0's positive, known by id here), a negative, and a repeat of it.
    negatives = [("p1", "passage one"), ("n5", "negative five"), ("", "negative five")]
    mask = in_batch_negative_mask(positives, negatives)
    assert mask.masked.tolist() == [[False, False, True, False, True],
                                    [False, False, True, False, True]]
    assert (mask.false_negatives, mask.repeats) == (1, 3)
    queries, documents = _unit(2, 8, 12), _unit(5, 8, 13)
    documents[2], documents[4] = documents[0], documents[3]
    masked = info_nce(queries, documents[:2], documents[2:], temperature=0.1, mask=mask.masked)
    # Query 1 still has passage one as a negative (its first copy, column 0), once.
    absent = _masked_reference(queries, documents, [[0, 1, 3], [0, 1, 3]], 0.1)
    torch.testing.assert_close(masked, absent)


def _fake_embed(dimension: int = 16):
    """A deterministic stand-in for the student: one fixed random unit vector per (task type, text)."""
    vectors: dict[tuple[str, str], torch.Tensor] = {}

    def embed(texts: list[str], task_type: str) -> torch.Tensor:
        for text in texts:
            if (task_type, text) not in vectors:
                vectors[task_type, text] = _unit(1, dimension, len(vectors) + 100)[0]
        return torch.stack([vectors[task_type, text] for text in texts])

    return embed


def _triplet_batch(examples: list[TripletExample]) -> tuple[Batch, TrainingData]:
    data = TrainingData(triplets=examples, classification=[], label_descriptions={}, teacher_dim=None)
    return Batch(task=("triplet", "RETRIEVAL_QUERY"), indices=tuple(range(len(examples)))), data


def test_batch_losses_mask_what_is_the_same_passage_and_report_it():
    # Two queries of one passage (by id; the second copy's text differs), and that passage again as row 2's mined
    # negative by text only; "negative a" twice.
    examples = [
        TripletExample("t", "query zero", "passage p", ("negative a",), positive_id="p", negative_ids=("a",)),
        TripletExample("t", "query one", "passage p (truncated)", ("negative b",), positive_id="p",
                       negative_ids=("b",)),
        TripletExample("t", "query two", "passage q", ("passage p", "negative a"), positive_id="q",
                       negative_ids=("", "a")),
    ]
    batch, data = _triplet_batch(examples)
    config = TrainConfig(matryoshka_dims=(), distillation_weight=0.0, spread_out_weight=0.0)
    embed, stats = _fake_embed(), {"queries": 0, "negatives": 0, "masked_false_negatives": 0, "masked_repeats": 0}
    terms = batch_losses(embed, None, batch, data, data.examples, config, (), stats=stats)
    queries = embed(["query zero", "query one", "query two"], "RETRIEVAL_QUERY")
    # Columns: positives p, p', q, then negatives a, b, p, a.
    documents = embed(["passage p", "passage p (truncated)", "passage q", "negative a", "negative b", "passage p",
                       "negative a"], "RETRIEVAL_DOCUMENT")
    absent = _masked_reference(queries, documents, [[0, 2, 3, 4], [1, 2, 3, 4], [0, 2, 3, 4]], config.temperature)
    torch.testing.assert_close(terms["infonce"], absent)
    # Query 0 and 1: p' (or p) and the mined p are false negatives, the second "a" a repeat; query 2: p' and the mined
    # p repeat p, the second "a" repeats a.
    assert stats == {"queries": 3, "negatives": 3 + 3 + 3, "masked_false_negatives": 4, "masked_repeats": 5}


def test_margin_mse_is_zero_only_when_the_score_margins_match():
    student_queries, student_positives, student_negatives = _unit(3, 16, 20), _unit(3, 16, 21), _unit(5, 16, 22)
    owners = torch.tensor([0, 0, 1, 2, 2])
    # A teacher of another dimension whose cosines are the student's: an isometry into 24 dimensions.
    rotation = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(23)))[0][:16]
    same_scores = dict(teacher_queries=student_queries @ rotation, teacher_positives=student_positives @ rotation,
                       teacher_negatives=student_negatives @ rotation)
    loss = margin_mse(student_queries, student_positives, student_negatives, owners=owners, **same_scores)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    other = dict(teacher_queries=_unit(3, 24, 24), teacher_positives=_unit(3, 24, 25),
                 teacher_negatives=_unit(5, 24, 26))
    student = student_negatives.clone().requires_grad_()
    loss = margin_mse(student_queries, student_positives, student, owners=owners, **other)
    loss.backward()
    assert loss.item() > 0.01 and student.grad.abs().sum() > 0
    # Only margins count: the same shift of every score leaves the loss at 0.
    queries = torch.tensor([[1.0, 0.0, 0.0]])
    assert margin_mse(queries, torch.tensor([[0.8, 0.6, 0.0]]), torch.tensor([[0.6, 0.8, 0.0]]),
                      owners=torch.tensor([0]), teacher_queries=queries,
                      teacher_positives=torch.tensor([[0.6, 0.8, 0.0]]),
                      teacher_negatives=torch.tensor([[0.4, 0.0, math.sqrt(0.84)]])).item() == pytest.approx(0.0,
                                                                                                          abs=1e-6)


def test_batch_losses_margin_distillation_reads_the_teacher_vectors():
    embed = _fake_embed()
    texts = {"query": ["q0", "q1"], "positive": ["p0", "p1"], "negatives": [("n0", "n1"), ("n2",)]}

    def example(index: int, teacher) -> TripletExample:
        negatives = texts["negatives"][index]
        return TripletExample(
            "t", texts["query"][index], texts["positive"][index], negatives, positive_id=texts["positive"][index],
            negative_ids=negatives, query_embedding=teacher([texts["query"][index]], "RETRIEVAL_QUERY")[0].numpy(),
            positive_embedding=teacher([texts["positive"][index]], "RETRIEVAL_DOCUMENT")[0].numpy(),
            negative_embeddings=teacher(list(negatives), "RETRIEVAL_DOCUMENT").numpy())

    config = TrainConfig(matryoshka_dims=(), infonce_weight=0.0, distillation_weight=0.0, spread_out_weight=0.0,
                         margin_distillation_weight=1.0)
    # The teacher is the student itself: margins agree, the loss is 0. Another teacher: it is not.
    batch, data = _triplet_batch([example(0, embed), example(1, embed)])
    assert batch_losses(embed, None, batch, data, data.examples, config, ())["margin_distillation"].item() == (
        pytest.approx(0.0, abs=1e-10))
    other = _fake_embed(dimension=8)
    batch, data = _triplet_batch([example(0, other), example(1, other)])
    terms = batch_losses(embed, None, batch, data, data.examples, config, ())
    assert set(terms) == {"margin_distillation"} and terms["margin_distillation"].item() > 1e-3


def test_matryoshka_averages_the_loss_over_truncations():
    queries, positives = _unit(4, 16, 1), _unit(4, 16, 2)
    total, per_dim = matryoshka(info_nce, (16, 8, 4), queries, positives, torch.zeros(0, 16), temperature=0.1)
    assert sorted(per_dim) == [4, 8, 16]
    expected = info_nce(truncate(queries, 8), truncate(positives, 8), torch.zeros(0, 8), temperature=0.1)
    assert torch.allclose(per_dim[8], expected)
    assert torch.allclose(total, torch.stack(list(per_dim.values())).mean())


def test_spread_out_is_zero_for_orthogonal_and_high_for_collapsed_embeddings():
    orthogonal = torch.eye(8)
    assert global_orthogonal_regularization(orthogonal).item() == pytest.approx(0.0)
    collapsed = torch.nn.functional.normalize(torch.ones(8, 8), dim=-1)
    assert global_orthogonal_regularization(collapsed).item() > 1.0
    assert global_orthogonal_regularization(collapsed[:1]).item() == 0.0


def test_embedding_matching_projects_only_when_dims_differ():
    student = _unit(5, 16, 3)
    assert EmbeddingMatching(16, 16).projection is None
    assert EmbeddingMatching(16, 16)(student, student.clone()).item() == pytest.approx(0.0, abs=1e-6)
    head = EmbeddingMatching(16, 4)
    assert head.projection.weight.shape == (4, 16)
    loss = head(student, _unit(5, 4, 4))
    loss.backward()
    assert 0 < loss.item() <= 2 and head.projection.weight.grad is not None


def test_label_classification_picks_the_text_label():
    labels = _unit(3, 8, 5)
    texts = labels[[2, 0, 1, 2]]
    targets = torch.tensor([2, 0, 1, 2])
    assert label_classification(texts, labels, targets, 0.05) < 0.01
    assert label_classification(texts, labels, targets.roll(1), 0.05) > 1.0


# ---- training (slow: real MiniLM on CPU) -----------------------------------------------------------------------------

TERMS = ("infonce", "distillation", "spread_out", "classification")


def _config(output_dir: str, **changes) -> TrainConfig:
    # Tiny settings: 2 shared CPU cores. projection_dim exercises the Dense module; the teacher's 32 dims the
    # distillation head.
    values = dict(max_seq_length=32, batch_size=4, max_steps=6, checkpoint_every=3, learning_rate=5e-5,
                  projection_dim=64, matryoshka_dims=(64, 32, 16), output_dir=output_dir, progress=False, seed=3)
    values.update(changes)
    return TrainConfig(**values)


def _history(run: str) -> list[dict]:
    with open(os.path.join(run, "losses.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    weights = {f"transformer.{k}": v for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    dense = os.path.join(model_dir, "2_Dense", "model.safetensors")
    if os.path.isfile(dense):
        weights.update({f"dense.{k}": v for k, v in load_file(dense).items()})
    return weights


@pytest.fixture(scope="module")
def trained_run(run_dir, tmp_path_factory) -> str:
    from embedder.train import train

    output = str(tmp_path_factory.mktemp("trained"))
    model_dir = train(_config(output), run_dir)
    assert model_dir == os.path.join(output, "model")
    return output


@pytest.mark.slow
def test_training_logs_every_loss_term(trained_run):
    history = _history(trained_run)
    assert [line["step"] for line in history] == [1, 2, 3, 4, 5, 6]
    for term in TERMS:
        values = [(line[term], line["examples"]) for line in history if term in line]
        assert values, f"{term} never computed"
        assert all(math.isfinite(value) for value, _ in values), (term, values)
        # A batch of one example (its texts clashed with every other example) has no pair to spread out.
        assert all(value > 0 for value, examples in values if examples > 1), (term, values)
    assert all(math.isfinite(line["loss"]) and line["examples_per_s"] > 0 for line in history)
    assert {"infonce@64", "infonce@16"} <= set().union(*history)
    assert os.path.getsize(os.path.join(trained_run, "losses.png")) > 0
    checkpoint_names = sorted(os.listdir(os.path.join(trained_run, "checkpoints")))
    assert checkpoint_names == ["step-0000003", "step-0000006"]
    summary = json.load(open(os.path.join(trained_run, "train_summary.json"), encoding="utf-8"))
    assert summary["steps"] == 6 and summary["teacher_dim"] == 32 and summary["distillation_head"]


@pytest.mark.slow
def test_batches_are_full_and_the_summary_says_what_they_held(trained_run):
    # shard_factory's negatives recur as other rows' negatives and positives: a sampler that kept texts apart made
    # short batches here; full batches keep all batch_size=4 examples and mask the repeats in the loss instead.
    history = _history(trained_run)
    summary = json.load(open(os.path.join(trained_run, "train_summary.json"), encoding="utf-8"))
    assert [line["examples"] for line in history] == [4] * 6
    assert summary["mean_batch_size"] == summary["mean_examples_per_step"] == 4
    triplet_steps = [line for line in history if "negatives_per_query" in line]
    assert triplet_steps, "no triplet batch in 6 steps"
    # At most 3 other positives and 4 x 2 hard negatives per query; masking leaves fewer where passages recur.
    assert all(0 < line["negatives_per_query"] <= 11 for line in triplet_steps)
    assert summary["mean_negatives_per_query"] == pytest.approx(
        np.mean([line["negatives_per_query"] for line in triplet_steps]))
    assert summary["masked_false_negatives"] == sum(line["masked_false_negatives"] for line in triplet_steps) > 0
    assert summary["masked_repeats"] == sum(line["masked_repeats"] for line in triplet_steps) > 0
    assert min(line["negatives_per_query"] for line in triplet_steps) < 11


@pytest.mark.slow
def test_a_training_step_with_only_margin_distillation_runs(run_dir, tmp_path):
    from embedder.train import train

    output = str(tmp_path / "margin")
    # No weight decay: a weight changes only where the margin loss has a gradient.
    train(_config(output, max_steps=2, checkpoint_every=1, weight_decay=0.0, infonce_weight=0.0,
                  distillation_weight=0.0, spread_out_weight=0.0, classification_weight=0.0,
                  margin_distillation_weight=1.0), run_dir)
    history = _history(output)
    assert all(set(TERMS).isdisjoint(line) for line in history)
    assert all(math.isfinite(line["margin_distillation"]) and line["margin_distillation"] > 0 for line in history)
    assert {"margin_distillation@64", "margin_distillation@16"} <= set(history[0])
    summary = json.load(open(os.path.join(output, "train_summary.json"), encoding="utf-8"))
    assert summary["data"]["classification_unused_weight_0"] == 12 and not summary["distillation_head"]
    first = _weights(os.path.join(output, "checkpoints", "step-0000001", "model"))
    last = _weights(os.path.join(output, "model"))
    assert not torch.equal(first["transformer.encoder.layer.0.attention.self.query.weight"],
                           last["transformer.encoder.layer.0.attention.self.query.weight"])


@pytest.mark.slow
def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(trained_run, run_dir, tmp_path):
    from embedder.train import train

    resumed_dir = str(tmp_path / "resumed")
    checkpoint = os.path.join(trained_run, "checkpoints", "step-0000003")
    train(_config(resumed_dir), run_dir, resume=checkpoint)
    expected, actual = _weights(os.path.join(trained_run, "model")), _weights(os.path.join(resumed_dir, "model"))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    drop = ("examples_per_s",)
    assert ([{k: v for k, v in line.items() if k not in drop} for line in _history(resumed_dir)]
            == [{k: v for k, v in line.items() if k not in drop} for line in _history(trained_run)])


@pytest.mark.slow
def test_resume_guards(trained_run, run_dir, tmp_path):
    from embedder.train import train

    with pytest.raises(ValueError, match="learning_rate"):
        train(_config(str(tmp_path / "other"), learning_rate=1e-4), run_dir, resume=trained_run)
    # resume=True on a finished run: nothing left to train, the same model comes back.
    again = train(_config(str(tmp_path / "again")), run_dir, resume=trained_run)
    expected = _weights(os.path.join(trained_run, "model"))
    assert all(torch.equal(value, expected[name]) for name, value in _weights(again).items())


class _Killed(Exception):
    """Stands for a kill at a chosen optimizer step."""


def _killed_after_step(monkeypatch, step: int) -> None:
    """The next training run stops with _Killed when it starts optimizer step `step` + 1 (one batch per step)."""
    from embedder import train as train_module

    batches = {"started": 0}
    batch_losses = train_module.batch_losses

    def counting_batch_losses(*args, **kwargs):
        batches["started"] += 1
        if batches["started"] > step:
            raise _Killed(f"killed at step {batches['started']}")
        return batch_losses(*args, **kwargs)

    monkeypatch.setattr(train_module, "batch_losses", counting_batch_losses)


@pytest.mark.slow
def test_training_again_replaces_the_student_only_once_the_new_one_is_finished(trained_run, run_dir, tmp_path,
                                                                                 monkeypatch):
    from embedder.train import staging_directory, train

    output = str(tmp_path / "student")
    shutil.copytree(trained_run, output)
    before = _weights(os.path.join(output, "model"))
    # A second run that dies after 4 of its 6 steps (past the checkpoint at step 3): the earlier student is untouched.
    _killed_after_step(monkeypatch, 4)
    with pytest.raises(_Killed):
        train(_config(output, learning_rate=1e-4), run_dir)
    after = _weights(os.path.join(output, "model"))
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert sorted(os.listdir(os.path.join(staging_directory(output), "checkpoints"))) == ["step-0000003"]
    monkeypatch.undo()

    # --resume continues that interrupted run from its checkpoint and then swaps it in, exactly as if never killed.
    resumed = train(_config(output, learning_rate=1e-4), run_dir, resume=True)
    uninterrupted = train(_config(str(tmp_path / "uninterrupted"), learning_rate=1e-4), run_dir)
    expected, actual = _weights(uninterrupted), _weights(resumed)
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert not any(torch.equal(actual[name], before[name]) for name in before if name.endswith("query.weight"))
    assert not os.path.exists(staging_directory(output))
    # Without --resume a run starts afresh, and replaces the one before it.
    again = train(_config(output), run_dir)
    assert all(torch.equal(value, before[name]) for name, value in _weights(again).items())
    assert sorted(os.listdir(os.path.join(output, "checkpoints"))) == ["step-0000003", "step-0000006"]


@pytest.mark.slow
def test_sentence_transformers_loads_the_student_with_its_prompts(trained_run):
    from sentence_transformers import SentenceTransformer

    from embedder.model import StudentEncoder

    model_dir = os.path.join(trained_run, "model")
    texts = ["how do the telescope and the galaxy relate?", "a recipe for bread", "short"]
    student = StudentEncoder.load(model_dir)
    reference = SentenceTransformer(model_dir, device="cpu")
    assert reference.encode(texts[:1]).shape == (1, student.dimension) == (1, 64)
    truncated = student.encode(texts, "RETRIEVAL_QUERY", dimension=16)
    assert truncated.shape == (3, 16) and truncated.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(truncated, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_every_task_type_embeds_with_its_trained_prompt_however_the_student_is_loaded(trained_run, tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedder.model import StudentEncoder
    from pipelines.clients.local_embedder import LocalEmbedder

    model_dir = os.path.join(trained_run, "model")
    with open(os.path.join(trained_run, "train_config.json"), encoding="utf-8") as handle:
        trained_prompts = json.load(handle)["task_prompts"]
    # Every task type was trained with a prompt of its own: a missing or swapped prompt changes the vectors.
    assert sorted(trained_prompts) == sorted(PROMPT_NAMES.values())
    assert len(set(trained_prompts.values())) == len(TaskType)
    texts = ["how do the telescope and the galaxy relate?", "a recipe for bread", "short"]
    reference = SentenceTransformer(model_dir, device="cpu")
    local = LocalEmbedder(model_dir, batch_size=2)
    student = StudentEncoder.load(model_dir)
    for task_type in TaskType:
        prompt = trained_prompts[prompt_name(task_type)]
        expected = reference.encode([prompt + text for text in texts], convert_to_numpy=True)
        by_name = reference.encode(texts, prompt_name=prompt_name(task_type), convert_to_numpy=True)
        np.testing.assert_allclose(by_name, expected, atol=1e-5, err_msg=task_type.value)
        np.testing.assert_allclose(local.embed(texts, task_type), expected, atol=1e-5, err_msg=task_type.value)
        np.testing.assert_allclose(student.encode(texts, task_type), expected, atol=1e-5, err_msg=task_type.value)
    np.testing.assert_allclose(reference.encode_query(texts), local.embed(texts, TaskType.RETRIEVAL_QUERY), atol=1e-5)
    np.testing.assert_allclose(reference.encode_document(texts), local.embed(texts, TaskType.RETRIEVAL_DOCUMENT),
                               atol=1e-5)

    # The same weights shipping EmbeddingGemma's prompt names read the same way, through the same table.
    gemma_names = {"query": "RETRIEVAL_QUERY", "document": "RETRIEVAL_DOCUMENT", "Classification": "CLASSIFICATION",
                   "STS": "SEMANTIC_SIMILARITY", "Clustering": "CLUSTERING"}
    gemma_dir = str(tmp_path / "gemma-named")
    shutil.copytree(model_dir, gemma_dir)
    config_path = os.path.join(gemma_dir, "config_sentence_transformers.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["prompts"] = {name: trained_prompts[task_type] for name, task_type in gemma_names.items()}
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    gemma_local, gemma_student = LocalEmbedder(gemma_dir), StudentEncoder.load(gemma_dir)
    for task_type in (TaskType.RETRIEVAL_QUERY, TaskType.QUESTION_ANSWERING, TaskType.RETRIEVAL_DOCUMENT,
                      TaskType.CLASSIFICATION, TaskType.SEMANTIC_SIMILARITY):
        # Question answering has no name of its own there: it falls back to the generic query prompt.
        name = "RETRIEVAL_QUERY" if task_type == TaskType.QUESTION_ANSWERING else prompt_name(task_type)
        expected = reference.encode([trained_prompts[name] + text for text in texts], convert_to_numpy=True)
        np.testing.assert_allclose(gemma_local.embed(texts, task_type), expected, atol=1e-5, err_msg=task_type.value)
        np.testing.assert_allclose(gemma_student.encode(texts, task_type), expected, atol=1e-5,
                                   err_msg=task_type.value)


@pytest.mark.slow
def test_overfitting_one_batch_lowers_the_loss(tmp_path):
    from embedder.train import train

    # Four triplets of one task with distinct texts: every step sees the same batch. No projection here, so the
    # saved model has no Dense module and the distillation head maps 384 -> 32.
    run = write_run(str(tmp_path / "tiny"), triplets=triplet_rows(4, tasks=("one task",), shared_negatives=False),
                    classification=[])
    output = str(tmp_path / "out")
    train(_config(output, max_steps=5, grad_accumulation=2, checkpoint_every=0, learning_rate=1e-4, warmup_ratio=0.0,
                  projection_dim=None, matryoshka_dims=(384, 128)), run)
    history = _history(output)
    assert [line["examples"] for line in history] == [8] * 5, "two micro-batches of four per step"
    losses = [line["loss"] for line in history]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    assert not os.path.isdir(os.path.join(output, "model", "2_Dense"))


@pytest.mark.slow
def test_training_reads_its_run_from_another_beam_filesystem(memfs, tmp_path):
    from embedder.train import train

    run = write_run(f"{memfs}/run", triplets=triplet_rows(8), classification=classification_rows(6))
    output = str(tmp_path / "out")
    model_dir = train(_config(output, max_steps=2, checkpoint_every=0), run)
    assert [line["step"] for line in _history(output)] == [1, 2]
    assert os.path.isfile(os.path.join(model_dir, "model.safetensors"))


@pytest.mark.slow
def test_soup_averages_weights(trained_run, tmp_path):
    from embedder.soup import soup

    first = os.path.join(trained_run, "checkpoints", "step-0000003")
    second = trained_run
    souped = soup([first, second], [3.0, 1.0], str(tmp_path / "soup"))
    a, b, mixed = _weights(os.path.join(first, "model")), _weights(os.path.join(second, "model")), _weights(souped)
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(mixed[name], 0.75 * a[name] + 0.25 * b[name], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sum to more than 0"):
        soup([first, second], [0.0, 0.0], str(tmp_path / "never"))
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        soup([str(tmp_path)], None, str(tmp_path / "never"))


@pytest.mark.slow
def test_soup_refuses_models_of_different_shapes(trained_run, tmp_path):
    from embedder.model import StudentEncoder
    from embedder.soup import soup

    other = StudentEncoder.load(os.path.join(trained_run, "model"))
    other.projection = torch.nn.Linear(other.hidden_size, 48)
    other.save(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not compatible.*differ in shape"):
        soup([os.path.join(trained_run, "model"), str(tmp_path / "other")], None, str(tmp_path / "never"))


def test_classification_rows_follow_the_schema():
    # The factory validates what it writes; this guards the factory itself for other tests reusing it.
    assert len({row["text"] for row in classification_rows(30)}) == 30


def test_triplets_with_different_free_text_tasks_share_batches(tmp_path):
    # Each generated triplet carries its own LLM-written task sentence; batching by that sentence would give batches
    # of one example and no in-batch negatives.
    rows = triplet_rows(8, tasks=tuple(f"Given a question {index}, retrieve passages" for index in range(8)),
                        shared_negatives=False)
    data = read_run(write_run(str(tmp_path / "run"), triplets=rows, classification=[]))
    batches = TaskBatchSampler.for_data(data, batch_size=4, seed=0).epoch_batches(0)
    assert [len(batch.indices) for batch in batches] == [4, 4]
    assert {batch.task for batch in batches} == {("triplet", "RETRIEVAL_QUERY")}
