"""Model identities resolved once per run and carried, with the cache and the budget, in one ModelAccess."""

from __future__ import annotations

from pipelines.budget import RunBudget
from pipelines.clients.factory import embedder_identity, llm_identity
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.model_access import ModelAccess, ModelIdentity, RunModels

LLM = LLMSpec(backend="custom", model="tests.fakes.scripted_backends:grader")
TEACHER = EmbedderSpec(backend="custom", model="tests.fakes.backends:keyword_embedder")


def test_run_models_are_the_factory_identities_named_id_at_version():
    models = RunModels.resolve(LLM, TEACHER)
    assert models.llm == llm_identity(LLM) and models.teacher == embedder_identity(TEACHER)
    assert models.llm.tag == f"{LLM.model_name}@custom"


def test_access_keeps_a_resolved_identity_and_resolves_one_only_when_not_given():
    budget = RunBudget(max_calls=3)
    given = ModelAccess.llm(LLM, "cache", budget, identity=ModelIdentity("already", "resolved"))
    assert (given.identity, given.cache_dir, given.budget) == (("already", "resolved"), "cache", budget)
    assert ModelAccess.embedder(TEACHER).identity == embedder_identity(TEACHER)
