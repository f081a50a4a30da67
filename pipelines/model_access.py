"""What a stage needs to call a model: the spec, the model's identity, the cache and the run's budget, in one object.

A model's identity (id, version) keys its cache entries and is written to the manifest and to every triplet. Resolving
it may read a model's files (`resolve_model`), so a run resolves each model once, while the pipeline is built
(`RunModels.resolve`), and hands the identities to the stages inside `ModelAccess`: workers never resolve one again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pipelines.budget import RunBudget
from pipelines.clients.factory import embedder_identity, llm_identity
from pipelines.clients.specs import EmbedderSpec, LLMSpec


class ModelIdentity(NamedTuple):
    """(model id, model version), as cache keys hold them."""

    model_id: str
    version: str

    @property
    def tag(self) -> str:
        """"id@version": how the manifest and triplets name the model."""
        return f"{self.model_id}@{self.version}"


@dataclass(frozen=True)
class RunModels:
    """The identities of a run's LLM and teacher, resolved once per run."""

    llm: ModelIdentity
    teacher: ModelIdentity

    @classmethod
    def resolve(cls, llm: LLMSpec, teacher: EmbedderSpec) -> RunModels:
        return cls(ModelIdentity(*llm_identity(llm)), ModelIdentity(*embedder_identity(teacher)))


@dataclass(frozen=True)
class ModelAccess:
    """Everything a stage needs to call one model through the cache: its spec, its resolved identity, the cache folder
    (None: no cache) and the run's budget (None: unlimited). Held by PTransforms while the pipeline is built; the
    DoFns they make receive plain values, never the budget."""

    spec: LLMSpec | EmbedderSpec
    identity: ModelIdentity
    cache_dir: str | None = None
    budget: RunBudget | None = None

    @classmethod
    def llm(cls, spec: LLMSpec, cache_dir: str | None = None, budget: RunBudget | None = None) -> ModelAccess:
        """Access to an LLM outside a run (a stage on its own, a benchmark): its identity is resolved here."""
        return cls(spec, ModelIdentity(*llm_identity(spec)), cache_dir, budget)

    @classmethod
    def embedder(cls, spec: EmbedderSpec, cache_dir: str | None = None, budget: RunBudget | None = None) -> ModelAccess:
        """Access to an embedder outside a run: its identity is resolved here."""
        return cls(spec, ModelIdentity(*embedder_identity(spec)), cache_dir, budget)
