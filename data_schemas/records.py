"""The record kinds that flow between stages and into the trainer: one pyarrow schema constant each, versioned.

Bump a schema's version whenever a column changes; writers, readers and tests change in the same commit.
Embeddings are `list<float32>` (not fixed-size) because the dimension is a run setting (Matryoshka truncation).
"""

from __future__ import annotations

import pyarrow as pa

from data_schemas.validate import versioned

_VECTOR = pa.list_(pa.float32())

PASSAGE = versioned("passage", 1, [
    pa.field("passage_id", pa.string(), nullable=False),
    pa.field("title", pa.string()),
    pa.field("text", pa.string(), nullable=False),
    # Where the passage came from: file path or URI, plus line / row number when the format has one.
    pa.field("source", pa.string(), nullable=False),
    pa.field("truncated", pa.bool_(), nullable=False),
])

# A synthetic query written for one passage (Gecko: the LLM writes a task description and a query), not yet graded:
# GenerateQueries' output and GradeRelevance's input. Never written to a shard; its schema name stays "pair".
UNGRADED_PAIR = versioned("pair", 1, [
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("query", pa.string(), nullable=False),
    pa.field("query_type", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("passage_id", pa.string(), nullable=False),
    pa.field("passage", pa.string(), nullable=False),
    pa.field("llm_model", pa.string(), nullable=False),
    pa.field("prompt_version", pa.string(), nullable=False),
])

# A pair that passed the relevance filter, with the evidence each enabled grader produced (null where disabled): the
# rows of a run's `pairs/` shards.
GRADED_PAIR = versioned("graded_pair", 1, [
    *UNGRADED_PAIR,
    pa.field("llm_relevance", pa.float32()),
    pa.field("llm_reason", pa.string()),
    # 1-based rank of the positive among the teacher's top-k for the query (Promptagator round-trip check).
    pa.field("roundtrip_rank", pa.int32()),
])

CLASSIFICATION_EXAMPLE = versioned("classification_example", 1, [
    pa.field("example_id", pa.string(), nullable=False),
    pa.field("task_name", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("label_description", pa.string(), nullable=False),
    # The other labels of the task: the negatives when training text -> label description.
    pa.field("negative_labels", pa.list_(pa.string()), nullable=False),
    # "seed" (given), "generated" (a new example for a label) or "counterfactual" (a seed minimally edited
    # to flip its label).
    pa.field("origin", pa.string(), nullable=False),
    pa.field("counterfactual_of", pa.string()),
    pa.field("original_label", pa.string()),
    pa.field("llm_model", pa.string()),
    pa.field("prompt_version", pa.string()),
])

TRIPLET = versioned("triplet", 1, [
    pa.field("triplet_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("query", pa.string(), nullable=False),
    pa.field("positive_id", pa.string(), nullable=False),
    pa.field("positive", pa.string(), nullable=False),
    # True when LLM scoring found a mined candidate clearly more relevant than the original positive and swapped them.
    pa.field("positive_relabeled", pa.bool_(), nullable=False),
    pa.field("negative_ids", pa.list_(pa.string()), nullable=False),
    pa.field("negatives", pa.list_(pa.string()), nullable=False),
    # Teacher cosine similarity of the query with the positive and with each negative (hardest first).
    pa.field("positive_teacher_score", pa.float32(), nullable=False),
    pa.field("negative_teacher_scores", pa.list_(pa.float32()), nullable=False),
    # Fused LLM relevance per negative; null when LLM scoring was off.
    pa.field("negative_llm_scores", pa.list_(pa.float32())),
    # Cached teacher embeddings for embedding-matching distillation; null when the run did not keep them.
    pa.field("query_embedding", _VECTOR),
    pa.field("positive_embedding", _VECTOR),
    pa.field("negative_embeddings", pa.list_(_VECTOR)),
    pa.field("teacher_model", pa.string(), nullable=False),
])

REJECTED = versioned("rejected", 1, [
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    # Id of the rejected record where it has one (passage id, pair id, line number for unparseable input).
    pa.field("record_id", pa.string()),
    # The rejected record as JSON, so nothing is lost and the row can be replayed.
    pa.field("payload", pa.string(), nullable=False),
    # The LLM's raw answer when an answer caused the rejection.
    pa.field("raw_answer", pa.string()),
    pa.field("detail", pa.string()),
])

EMBEDDING_CACHE_ENTRY = versioned("embedding_cache_entry", 1, [
    # sha256 over model id, model version, task type, dimension and text: the content address.
    pa.field("key", pa.string(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("task_type", pa.string(), nullable=False),
    pa.field("dimension", pa.int32(), nullable=False),
    pa.field("text_sha256", pa.string(), nullable=False),
    pa.field("embedding", _VECTOR, nullable=False),
])

LLM_CACHE_ENTRY = versioned("llm_cache_entry", 1, [
    # sha256 over model id, model version, prompt name + version, rendered messages, output schema, generation config.
    pa.field("key", pa.string(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("prompt_name", pa.string(), nullable=False),
    pa.field("prompt_version", pa.string(), nullable=False),
    # The validated answer as JSON (only successes are cached) and the raw text it was parsed from.
    pa.field("response_json", pa.string(), nullable=False),
    pa.field("raw_answer", pa.string(), nullable=False),
    pa.field("input_tokens", pa.int64(), nullable=False),
    pa.field("output_tokens", pa.int64(), nullable=False),
])
