"""Versioned pyarrow schemas: the contract between pipeline stages, the trainer and the publisher."""

from data_schemas.manifest import MANIFEST, load_manifest, stage_balances, validate_manifest
from data_schemas.records import (
    CLASSIFICATION_EXAMPLE,
    EMBEDDING_CACHE_ENTRY,
    GRADED_PAIR,
    LLM_CACHE_ENTRY,
    PAIR,
    PASSAGE,
    REJECTED,
    TRIPLET,
)
from data_schemas.validate import SchemaError, schema_id, validate_rows, validate_table

#: Record kind, as used in shard folder names -> schema. The `pairs` a run publishes are the graded ones (PAIR is the
#: shape between GenerateQueries and GradeRelevance and is never written).
SCHEMAS = {
    "passages": PASSAGE,
    "pairs": GRADED_PAIR,
    "classification": CLASSIFICATION_EXAMPLE,
    "triplets": TRIPLET,
    "rejected": REJECTED,
    "embedding_cache": EMBEDDING_CACHE_ENTRY,
    "llm_cache": LLM_CACHE_ENTRY,
}

__all__ = [
    "CLASSIFICATION_EXAMPLE", "EMBEDDING_CACHE_ENTRY", "GRADED_PAIR", "LLM_CACHE_ENTRY", "MANIFEST", "PAIR", "PASSAGE",
    "REJECTED", "SCHEMAS", "TRIPLET", "SchemaError", "load_manifest", "schema_id", "stage_balances",
    "validate_manifest", "validate_rows", "validate_table",
]
