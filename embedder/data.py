"""Training data: read a run's shards into examples, and sample full single-task batches.

`read_run(data_dir)` reads `triplets/*.parquet` (TRIPLET) and `classification/*.parquet` (CLASSIFICATION_EXAMPLE),
validating every shard with `data_schemas.validate_table`, so a bad shard fails with its file, row and column. Empty
shards are fine (Beam's WriteToParquet can leave one). Shards are found and read through Beam's `FileSystems`, as
`embforge generate` wrote them: a run on gs://, s3:// or any registered filesystem trains where it lies. Rows are kept
in memory: a CPU-scale run holds a few thousand.

A triplet keeps its passage ids (`positive_id`, `negative_ids`) beside the texts: the trainer needs them to tell when
two in-batch candidates are the same passage.

`TaskBatchSampler` yields batches that
  1. hold examples of one task only: triplets of one query task type (the prompt in front of their queries; a
     triplet's free-text `task` is the LLM's per-example instruction, so it does not split batches), or one
     classification `task_name`: in-batch negatives from another task would be trivially easy, and prompts differ;
  2. are full: `batch_size` examples in the epoch's seeded order, only the last batch of each task in an epoch
     shorter. Texts may repeat across the examples of a batch (one passage yields several queries; mined negatives
     recur), and a repeated passage would be a false in-batch negative: the loss masks those (see
     `embedder.losses.in_batch_negative_mask`) instead of the sampler splitting batches around them, which on real
     runs left batches of 16 holding 3 or 4 examples;
  3. are a pure function of (seed, epoch), so the state (epoch, position) restores the exact stream.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from data_schemas import CLASSIFICATION_EXAMPLE, TRIPLET, SchemaError
from pipelines.clients.base import TaskType
from pipelines.run_layout import read_shard, shard_paths


@dataclass(frozen=True)
class TripletExample:
    task: str
    query: str
    positive: str
    negatives: tuple[str, ...]
    #: Passage ids of the positive and of each negative (TRIPLET `positive_id`, `negative_ids`); "" / () where unknown
    #: (hand-built examples), and then a passage is known by its text alone.
    positive_id: str = ""
    negative_ids: tuple[str, ...] = ()
    #: Teacher embeddings (float32), all three or none: (D,), (D,), (len(negatives), D).
    query_embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    positive_embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    negative_embeddings: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.query, self.positive, *self.negatives)

    @property
    def has_teacher(self) -> bool:
        return self.query_embedding is not None


@dataclass(frozen=True)
class ClassificationExample:
    task: str
    text: str
    label: str
    #: Labels of the task other than `label`: the negatives.
    negative_labels: tuple[str, ...]

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.text,)


@dataclass
class TrainingData:
    triplets: list[TripletExample]
    classification: list[ClassificationExample]
    #: classification task -> label -> description (the text the student learns to match).
    label_descriptions: dict[str, dict[str, str]]
    #: Dimension of the cached teacher embeddings; None when no triplet row has them.
    teacher_dim: int | None
    #: What was read and what was dropped, and why.
    counts: Counter = field(default_factory=Counter)

    @property
    def examples(self) -> list[TripletExample | ClassificationExample]:
        """Triplets then classification examples: the index space of `TaskBatchSampler`."""
        return [*self.triplets, *self.classification]

    def label_text(self, task: str, label: str) -> str:
        # A negative label never seen as a positive has no description: its name is the best text there is.
        return self.label_descriptions.get(task, {}).get(label, label)


def _vectors(values: list | None, path: str, row: int, column: str, dim: int | None) -> np.ndarray | None:
    if values is None:
        return None
    try:
        array = np.asarray(values, dtype=np.float32)
    except ValueError:
        raise SchemaError("teacher embeddings of different sizes", source=path, row=row, column=column) from None
    if array.size == 0 or (dim is not None and array.shape[-1] != dim):
        raise SchemaError(f"teacher embedding of size {array.shape[-1] if array.size else 0}, expected {dim}",
                          source=path, row=row, column=column)
    return array


def _triplets(path: str, table: pa.Table, data: TrainingData) -> None:
    rows = table.select(["task", "query", "positive_id", "positive", "negative_ids", "negatives", "query_embedding",
                         "positive_embedding", "negative_embeddings"]).to_pylist()
    for row_index, row in enumerate(rows):
        data.counts["triplet_rows"] += 1
        vectors = (row["query_embedding"], row["positive_embedding"], row["negative_embeddings"])
        if any(value is None for value in vectors) and not all(value is None for value in vectors):
            # Half a set of teacher vectors is a writer bug, not something to train around.
            raise SchemaError("query_embedding, positive_embedding and negative_embeddings must be all set or all "
                              "null", source=path, row=row_index, column="query_embedding")
        query_vector = positive_vector = negative_vectors = None
        if vectors[0] is not None:
            if data.teacher_dim is None:
                data.teacher_dim = len(vectors[0])
            query_vector = _vectors(vectors[0], path, row_index, "query_embedding", data.teacher_dim)
            positive_vector = _vectors(vectors[1], path, row_index, "positive_embedding", data.teacher_dim)
            if len(vectors[2]) != len(row["negatives"]):
                raise SchemaError(f"{len(vectors[2])} negative embeddings for {len(row['negatives'])} negatives",
                                  source=path, row=row_index, column="negative_embeddings")
            negative_vectors = (_vectors(vectors[2], path, row_index, "negative_embeddings", data.teacher_dim)
                                if vectors[2] else np.zeros((0, data.teacher_dim), dtype=np.float32))
        if len(row["negative_ids"]) != len(row["negatives"]):
            raise SchemaError(f"{len(row['negative_ids'])} negative ids for {len(row['negatives'])} negatives",
                              source=path, row=row_index, column="negative_ids")
        if row["query"] == row["positive"]:
            data.counts["dropped_query_equals_positive"] += 1
            continue
        # A negative equal to the query, the positive or an earlier negative (by text, or by passage id) would be a
        # false negative inside the example itself: drop that negative (and its teacher vector), keep the example.
        seen_texts, seen_ids = {row["query"], row["positive"]}, {row["positive_id"]} - {""}
        keep = []
        for index, (negative_id, negative) in enumerate(zip(row["negative_ids"], row["negatives"], strict=True)):
            if negative in seen_texts or negative_id in seen_ids:
                data.counts["dropped_duplicate_negative"] += 1
                continue
            seen_texts.add(negative)
            if negative_id:
                seen_ids.add(negative_id)
            keep.append(index)
        if negative_vectors is not None:
            negative_vectors = negative_vectors[keep]
        data.triplets.append(TripletExample(
            task=row["task"], query=row["query"], positive=row["positive"],
            negatives=tuple(row["negatives"][index] for index in keep), positive_id=row["positive_id"],
            negative_ids=tuple(row["negative_ids"][index] for index in keep), query_embedding=query_vector,
            positive_embedding=positive_vector, negative_embeddings=negative_vectors,
        ))


def _classification(path: str, table: pa.Table, data: TrainingData) -> None:
    rows = table.select(["task_name", "text", "label", "label_description", "negative_labels"]).to_pylist()
    for row_index, row in enumerate(rows):
        data.counts["classification_rows"] += 1
        descriptions = data.label_descriptions.setdefault(row["task_name"], {})
        known = descriptions.setdefault(row["label"], row["label_description"])
        if known != row["label_description"]:
            # Two descriptions for one label would make the target move between batches.
            raise SchemaError(f"label {row['label']!r} of task {row['task_name']!r} is described as "
                              f"{row['label_description']!r} here and as {known!r} in an earlier row",
                              source=path, row=row_index, column="label_description")
        negatives = tuple(dict.fromkeys(label for label in row["negative_labels"] if label != row["label"]))
        data.classification.append(ClassificationExample(task=row["task_name"], text=row["text"], label=row["label"],
                                                         negative_labels=negatives))


def read_run(data_dir: str) -> TrainingData:
    """Every triplet and classification example under `data_dir` (a run's output directory)."""
    data = TrainingData(triplets=[], classification=[], label_descriptions={}, teacher_dim=None)
    for kind, schema, add in (("triplets", TRIPLET, _triplets), ("classification", CLASSIFICATION_EXAMPLE,
                                                                  _classification)):
        for path in shard_paths(data_dir, kind):
            data.counts[f"{kind}_shards"] += 1
            table = read_shard(path, schema)
            if table.num_rows == 0:
                data.counts[f"{kind}_empty_shards"] += 1
                continue
            add(path, table, data)
    if not data.triplets and not data.classification:
        raise ValueError(f"{data_dir}: no training rows (expected triplets/*.parquet or classification/*.parquet "
                         f"with rows; found {data.counts['triplets_shards']} triplet and "
                         f"{data.counts['classification_shards']} classification shards)")
    return data


# ---- batching -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    #: ("triplet" | "classification", task name)
    task: tuple[str, str]
    #: Indices into `TrainingData.examples`.
    indices: tuple[int, ...]


@dataclass(frozen=True)
class SamplerState:
    epoch: int = 0
    #: Batches of `epoch` already handed out.
    position: int = 0


def example_task(example: TripletExample | ClassificationExample,
                 triplet_task_type: Callable[[str], str]) -> tuple[str, str]:
    """The batch key: ("triplet", query task type) or ("classification", task name)."""
    if isinstance(example, TripletExample):
        return "triplet", triplet_task_type(example.task)
    return "classification", example.task


class TaskBatchSampler:
    """Full single-task batches in a seeded order; see the module docstring."""

    #: Written into the state: a state from a sampler that batched otherwise (the earlier duplicate-free one) would
    #: not resume the same stream.
    POLICY = "full-single-task"

    def __init__(self, tasks: Sequence[tuple[str, str]], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not tasks:
            raise ValueError("no examples to sample from")
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.seed = seed
        self.state = SamplerState()
        self._cache: tuple[int, list[Batch]] | None = None

    @classmethod
    def for_data(cls, data: TrainingData, batch_size: int, seed: int,
                 triplet_task_type: Callable[[str], str] = lambda task: TaskType.RETRIEVAL_QUERY.value,
                 ) -> TaskBatchSampler:
        return cls([example_task(example, triplet_task_type) for example in data.examples], batch_size, seed)

    def epoch_batches(self, epoch: int) -> list[Batch]:
        """All batches of `epoch`, in order. Deterministic in (seed, epoch); every example exactly once."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        # Own generator per epoch, seeded by (seed, epoch): no global RNG, and any epoch can be rebuilt on resume.
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.tasks))
        by_task: dict[tuple[str, str], list[int]] = {}
        for index in order.tolist():
            by_task.setdefault(self.tasks[index], []).append(index)
        batches = [Batch(task=task, indices=tuple(by_task[task][start:start + self.batch_size]))
                   for task in sorted(by_task) for start in range(0, len(by_task[task]), self.batch_size)]
        # Interleave the tasks: a fixed task order would train on one task at a time.
        shuffled = [batches[index] for index in rng.permutation(len(batches)).tolist()]
        self._cache = (epoch, shuffled)
        return shuffled

    def __len__(self) -> int:
        """Batches in the current epoch."""
        return len(self.epoch_batches(self.state.epoch))

    def next_batch(self) -> Batch:
        batches = self.epoch_batches(self.state.epoch)
        if self.state.position >= len(batches):
            self.state = SamplerState(epoch=self.state.epoch + 1, position=0)
            batches = self.epoch_batches(self.state.epoch)
        batch = batches[self.state.position]
        self.state = SamplerState(epoch=self.state.epoch, position=self.state.position + 1)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | str]:
        return {"epoch": self.state.epoch, "position": self.state.position, "seed": self.seed,
                "examples": len(self.tasks), "batch_size": self.batch_size, "policy": self.POLICY}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        # A state without "policy" comes from the earlier duplicate-free sampler, which made other (smaller) batches.
        theirs_by_key = {"policy": "duplicate-free", **state}
        for key, mine in (("seed", self.seed), ("examples", len(self.tasks)), ("batch_size", self.batch_size),
                          ("policy", self.POLICY)):
            theirs = theirs_by_key.get(key, mine)
            if theirs != mine:
                raise ValueError(f"sampler state is for {key}={theirs}, this sampler has {key}={mine}: resuming "
                                 "on other data or settings would not reproduce the run")
        self.state = SamplerState(epoch=int(state["epoch"]), position=int(state["position"]))
