"""Versioned pyarrow schemas: the contract between pipeline stages, the trainer and the publisher."""

from data_schemas.manifest import MANIFEST, load_manifest, stage_balances, validate_manifest
from data_schemas.records import (
    CLASSIFICATION_EXAMPLE,
    EMBEDDING_CACHE_ENTRY,
    GRADED_PAIR,
    LLM_CACHE_ENTRY,
    PASSAGE,
    REJECTED,
    TRIPLET,
    UNGRADED_PAIR,
)
from data_schemas.validate import SchemaError, schema_id, validate_rows, validate_table

#: Record kind, as used in shard folder names -> schema. The names on disk (kinds, schema names, stage names in the
#: manifest, prompt names in cache keys) are part of published datasets and caches, so they stay as they are; this is
#: how they correspond (stages in run order, see pipelines/run.py; docs/architecture.md has the whole flow):
#:
#:   kind             schema                  written by stage          its prompts (prompts/<name>/)
#:   passages         PASSAGE                 read_corpus               -
#:   pairs            GRADED_PAIR             grade_relevance           relevance_grading; its input, UNGRADED_PAIR
#:                                                                      (schema "pair"), comes from generate_queries
#:                                                                      with query_generation and is never written
#:   triplets         TRIPLET                 mine_negatives            negative_scoring, query_likelihood (optional)
#:   classification   CLASSIFICATION_EXAMPLE  generate_counterfactuals  example_generation, counterfactual_generation,
#:                                                                      label_judgment (optional)
#:   rejected         REJECTED                every stage               -
#:   embedding_cache  EMBEDDING_CACHE_ENTRY   every EmbedTeacher use    - (<cache_dir>/embeddings/<model>/<task type>/)
#:   llm_cache        LLM_CACHE_ENTRY         every LLM call            the prompt name and version are in the key
#:                                                                      (<cache_dir>/llm/<prompt>@<version>/<model>/)
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
    "CLASSIFICATION_EXAMPLE", "EMBEDDING_CACHE_ENTRY", "GRADED_PAIR", "LLM_CACHE_ENTRY", "MANIFEST", "PASSAGE",
    "REJECTED", "SCHEMAS", "TRIPLET", "UNGRADED_PAIR", "SchemaError", "load_manifest", "schema_id", "stage_balances",
    "validate_manifest", "validate_rows", "validate_table",
]
