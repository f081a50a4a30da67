"""Backend specs (small frozen dataclasses that pickle for Beam) and the factories that build clients from them.

DoFns keep a spec and call `build_llm` / `build_embedder` in `setup()`, so no client or model is ever pickled.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from pipelines.clients.base import LLM, Embedder

DEFAULT_GEMINI_LLM = "gemini-2.5-flash"
DEFAULT_GEMINI_EMBEDDER = "gemini-embedding-001"
DEFAULT_LOCAL_LLM = "packaged:smollm2-135m-instruct"
DEFAULT_LOCAL_TEACHER = "packaged:all-mpnet-base-v2"
DEFAULT_LOCAL_STUDENT = "packaged:all-minilm-l6-v2"


@dataclass(frozen=True)
class LLMSpec:
    #: "custom" builds the client by calling `model` ("package.module:callable"), for plug-in backends and test fakes.
    backend: Literal["local", "gemini", "custom"] = "local"
    #: Hub id, local path, `packaged:<name>`, Gemini model name or custom factory; empty means the backend's default.
    model: str = ""
    #: Gemini: override the API endpoint (tests point it at the local fake server).
    base_url: str | None = None
    api_version: str | None = None
    timeout_s: float = 60.0
    #: Attempts per call for transient failures (429, 5xx, timeouts), the first included.
    max_attempts: int = 6
    #: Backoff between transient retries: exponential from `backoff_initial_s` with jitter, capped at `backoff_max_s`;
    #: a server's Retry-After (or RetryInfo) hint replaces it, honoured up to the same cap.
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    #: Attempts per call when the answer does not parse or violates the output schema.
    max_parse_attempts: int = 3
    #: Gemini thinking budget in tokens; None keeps the model's default. On 2.5 Flash thinking tokens count against
    #: max_output_tokens, so 0 (thinking off) keeps a short JSON answer from being cut off and costs less.
    thinking_budget: int | None = None
    #: Requests in flight at once (API backends).
    concurrency: int = 8
    #: Local: torch device and the folder where converted weights are kept between runs.
    device: str = "cpu"
    cache_dir: str | None = None
    #: Local: torch intra-op threads (default: $EMBFORGE_TORCH_THREADS, else the CPUs available). With Beam's
    #: multi_processing runner keep workers x threads <= cores.
    torch_threads: int | None = None

    @property
    def model_name(self) -> str:
        return self.model or (DEFAULT_GEMINI_LLM if self.backend == "gemini" else DEFAULT_LOCAL_LLM)


@dataclass(frozen=True)
class EmbedderSpec:
    backend: Literal["local", "gemini", "custom"] = "local"
    model: str = ""
    base_url: str | None = None
    api_version: str | None = None
    timeout_s: float = 60.0
    max_attempts: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    concurrency: int = 8
    device: str = "cpu"
    cache_dir: str | None = None
    batch_size: int = 32
    #: Local: as `LLMSpec.torch_threads`.
    torch_threads: int | None = None
    #: Local: (task type, prompt prefix) pairs overriding the model's own prompts; a tuple so the spec stays hashable.
    task_prompts: tuple[tuple[str, str], ...] = ()

    @property
    def model_name(self) -> str:
        return self.model or (DEFAULT_GEMINI_EMBEDDER if self.backend == "gemini" else DEFAULT_LOCAL_TEACHER)


def _call_factory(path: str):
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"custom backend needs model='package.module:callable', got {path!r}")
    return getattr(importlib.import_module(module_name), attribute)()


def build_llm(spec: LLMSpec) -> LLM:
    if spec.backend == "custom":
        return _call_factory(spec.model)
    if spec.backend == "gemini":
        from pipelines.clients.gemini import GeminiLLM

        return GeminiLLM.from_spec(spec)
    if spec.backend == "local":
        from pipelines.clients.local_llm import LocalLLM

        return LocalLLM.from_spec(spec)
    raise ValueError(f"unknown LLM backend {spec.backend!r}: expected 'local', 'gemini' or 'custom'")


def build_embedder(spec: EmbedderSpec) -> Embedder:
    if spec.backend == "custom":
        return _call_factory(spec.model)
    if spec.backend == "gemini":
        from pipelines.clients.gemini import GeminiEmbedder

        return GeminiEmbedder.from_spec(spec)
    if spec.backend == "local":
        from pipelines.clients.local_embedder import LocalEmbedder

        return LocalEmbedder.from_spec(spec)
    raise ValueError(f"unknown embedder backend {spec.backend!r}: expected 'local', 'gemini' or 'custom'")


def llm_identity(spec: LLMSpec) -> tuple[str, str]:
    """(model id, model version) for cache keys, known without loading the model."""
    if spec.backend == "gemini":
        # Gemini models are versioned by name (gemini-2.5-flash-001 vs -002); the name is the version.
        return spec.model_name, spec.model_name
    if spec.backend == "custom":
        return spec.model_name, "custom"
    from pipelines.clients.packaged_models import resolve_model

    return spec.model_name, resolve_model(spec.model_name, spec.cache_dir).model_version


def embedder_identity(spec: EmbedderSpec) -> tuple[str, str]:
    if spec.backend == "gemini":
        return spec.model_name, spec.model_name
    if spec.backend == "custom":
        return spec.model_name, "custom"
    from pipelines.clients.packaged_models import resolve_model

    return spec.model_name, resolve_model(spec.model_name, spec.cache_dir).model_version
