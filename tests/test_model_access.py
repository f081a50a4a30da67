"""Model identities resolved once per run and carried, with the cache and the budget, in one ModelAccess."""

from __future__ import annotations

from pipelines.budget import RunBudget
from pipelines.clients.factory import embedder_identity, llm_identity
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.model_access import ModelAccess, RunModels

LLM = LLMSpec(backend="custom", model="tests.fakes.scripted_backends:grader")
TEACHER = EmbedderSpec(backend="custom", model="tests.fakes.backends:keyword_embedder")


def test_run_models_are_the_factory_identities_named_id_at_version():
    models = RunModels.resolve(LLM, TEACHER)
    assert models.llm == llm_identity(LLM) and models.teacher == embedder_identity(TEACHER)
    assert models.llm.tag == f"{LLM.model_name}@custom"


def test_access_outside_a_run_resolves_the_identity_and_keeps_the_cache_and_budget():
    budget = RunBudget(max_calls=3)
    access = ModelAccess.llm(LLM, "cache", budget)
    assert (access.identity, access.cache_dir, access.budget) == (llm_identity(LLM), "cache", budget)
    assert ModelAccess.embedder(TEACHER).identity == embedder_identity(TEACHER)
