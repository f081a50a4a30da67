"""Synthetic run directories for trainer tests: `triplets/*.parquet` and `classification/*.parquet` that follow
`data_schemas` exactly, small enough to train a few steps on CPU.

The data is learnable on purpose: each topic owns a few keywords, a query names two of them, its positive passage
repeats them, and its hard negatives are passages of other topics. Hard negatives are shared between rows (as mined
negatives are) and are other rows' positives, so a full batch holds some passages more than once: what the trainer's
in-batch masking is for. Teacher embeddings come from the keyword embedder in tests/fakes/backends.py at a dimension
other than the student's (32 by default), which exercises the distillation projection.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from data_schemas import CLASSIFICATION_EXAMPLE, TRIPLET, validate_rows
from pipelines.clients.base import TaskType
from tests.fakes.backends import KeywordEmbedder

TOPICS: dict[str, tuple[str, ...]] = {
    "astronomy": ("telescope", "galaxy", "orbit", "comet"),
    "cooking": ("recipe", "oven", "flour", "simmer"),
    "football": ("goalkeeper", "penalty", "striker", "stadium"),
    "finance": ("dividend", "bond", "inflation", "portfolio"),
    "music": ("violin", "chord", "symphony", "tempo"),
    "medicine": ("vaccine", "symptom", "dosage", "surgeon"),
    "gardening": ("compost", "seedling", "pruning", "mulch"),
    "computing": ("compiler", "kernel", "cache", "thread"),
}

#: Triplet tasks written by default: two, so "one task per batch" is observable.
TRIPLET_TASKS = ("Given a question, retrieve passages that answer it", "Given a claim, find evidence for it")

LABELS = {
    "positive": "The text expresses a positive, happy or approving opinion.",
    "negative": "The text expresses a negative, angry or disapproving opinion.",
    "neutral": "The text states facts without expressing an opinion.",
}
_OPINIONS = {
    "positive": ("I loved the {}, it was wonderful", "what a great {}, truly delightful", "the {} made me so happy"),
    "negative": ("I hated the {}, it was awful", "what a terrible {}, truly annoying", "the {} made me so angry"),
    "neutral": ("the {} is listed in the catalogue", "the {} was moved on tuesday", "a {} has four parts"),
}


def _passage(topic: str, variant: int) -> str:
    words = TOPICS[topic]
    first, second = words[variant % 4], words[(variant + 1) % 4]
    return f"This passage about {topic} explains the {first} and the {second} in detail (part {variant})."


def teacher_embedder(dimension: int = 32) -> KeywordEmbedder:
    vocabulary = sorted({word for words in TOPICS.values() for word in words} | set(TOPICS))
    # Keyword axes need room: the vocabulary must fit below the dimension, so small dims keep only the topic names.
    if len(vocabulary) >= dimension:
        vocabulary = sorted(TOPICS)[: dimension - 1]
    return KeywordEmbedder(vocabulary, dimension=dimension)


def triplet_rows(count: int = 24, *, tasks: Sequence[str] = TRIPLET_TASKS, negatives_per_row: int = 2,
                 teacher_dim: int | None = 32, shared_negatives: bool = True) -> list[dict]:
    """`count` TRIPLET rows cycling over topics and tasks; teacher vectors of `teacher_dim` (None: null columns).

    `shared_negatives`: negatives are other topics' first passages, which recur as other rows' negatives and
    positives (as mined negatives do); False gives every row negatives of its own, so no text repeats anywhere.
    """
    topics = sorted(TOPICS)
    teacher = teacher_embedder(teacher_dim) if teacher_dim else None
    rows = []
    for index in range(count):
        topic = topics[index % len(topics)]
        variant = index // len(topics)
        words = TOPICS[topic]
        query = f"question {index}: how do the {words[variant % 4]} and the {words[(variant + 1) % 4]} relate?"
        positive = _passage(topic, variant)
        # Passages of the next topics, variant 0: the same negative text recurs in several rows.
        negative_topics = [topics[(index + offset) % len(topics)] for offset in range(1, negatives_per_row + 1)]
        negatives = [_passage(other, 0 if shared_negatives else 1000 + index) for other in negative_topics]
        row = {
            "triplet_id": f"t{index}",
            "task": tasks[index % len(tasks)],
            "query_id": f"q{index}",
            "query": query,
            "positive_id": f"{topic}-{variant}",
            "positive": positive,
            "positive_relabeled": False,
            "negative_ids": [f"{other}-0" for other in negative_topics],
            "negatives": negatives,
            "positive_teacher_score": 0.8,
            "negative_teacher_scores": [0.3] * len(negatives),
            "negative_llm_scores": None,
            "query_embedding": None,
            "positive_embedding": None,
            "negative_embeddings": None,
            "teacher_model": "keyword-embedder@1",
        }
        if teacher is not None:
            row["query_embedding"] = teacher.embed([query], TaskType.RETRIEVAL_QUERY)[0].tolist()
            row["positive_embedding"] = teacher.embed([positive], TaskType.RETRIEVAL_DOCUMENT)[0].tolist()
            row["negative_embeddings"] = teacher.embed(negatives, TaskType.RETRIEVAL_DOCUMENT).tolist()
        rows.append(row)
    return rows


def classification_rows(count: int = 12, *, task_name: str = "sentiment") -> list[dict]:
    """`count` CLASSIFICATION_EXAMPLE rows over three labels; every text distinct."""
    labels = sorted(LABELS)
    things = [word for words in TOPICS.values() for word in words]
    rows = []
    for index in range(count):
        label = labels[index % len(labels)]
        template = _OPINIONS[label][(index // len(labels)) % len(_OPINIONS[label])]
        rows.append({
            "example_id": f"c{index}",
            "task_name": task_name,
            "text": template.format(things[index % len(things)]) + f" (#{index})",
            "label": label,
            "label_description": LABELS[label],
            "negative_labels": [other for other in labels if other != label],
            "origin": "generated",
            "counterfactual_of": None,
            "original_label": None,
            "llm_model": "scripted-llm@1",
            "prompt_version": "1",
        })
    return rows


def write_shard(path: str, rows: list[dict], schema: pa.Schema) -> str:
    """Write `rows` as one Parquet shard at `path`: a local path or any Beam filesystem's (memfs:// in tests)."""
    validate_rows(rows, schema, source=path)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    with FileSystems.create(path) as handle:
        handle.write(buffer.getvalue())
    return path


def write_run(root: str, *, triplets: list[dict] | None = None, classification: list[dict] | None = None,
              shards: int = 2, empty_shard: bool = True) -> str:
    """A run directory (local, or on any Beam filesystem) with the rows split over `shards` shards per kind, plus an
    empty shard of each kind.

    Defaults: `triplet_rows()` and `classification_rows()`; pass [] to leave a kind out.
    """
    triplets = triplet_rows() if triplets is None else triplets
    classification = classification_rows() if classification is None else classification
    for kind, rows, schema in (("triplets", triplets, TRIPLET), ("classification", classification,
                                                                 CLASSIFICATION_EXAMPLE)):
        for shard in range(shards if rows else 0):
            write_shard(FileSystems.join(root, kind, f"part-{shard:05d}-of-{shards:05d}.parquet"),
                        rows[shard::shards], schema)
        if empty_shard and rows:
            write_shard(FileSystems.join(root, kind, "part-empty.parquet"), [], schema)
    return root
