"""The one place a spec (pipelines/clients/specs.py) meets a backend: `build_llm` / `build_embedder` map a spec's fields
onto the plain arguments of the backend it names, once per backend, and the rest of the module says what a spec
implies without building anything: model identities for cache keys, billable output tokens.

DoFns keep a spec and call `build_llm` / `build_embedder` in `setup()`, so no client or model is ever pickled. A
backend is imported only when one is built: a local run never loads the Gemini SDK (most of a second).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipelines.clients.base import LLM, Embedder, TaskType
from pipelines.clients.gemini_thinking import gemini_output_token_limit, gemini_thinking_budget, thinking_range
from pipelines.clients.specs import OPENAI_BASE_URL, EmbedderSpec, LLMSpec

if TYPE_CHECKING:
    from pipelines.clients.gemini import GeminiEndpoint
    from pipelines.clients.gemini_batch import GeminiBatchClient


def build_llm(spec: LLMSpec) -> LLM:
    return _build(spec, "LLM", {"gemini": _gemini_llm, "openai": _openai_llm, "local": _local_llm})


def build_embedder(spec: EmbedderSpec) -> Embedder:
    return _build(spec, "embedder", {"gemini": _gemini_embedder, "local": _local_embedder})


def _build(spec: LLMSpec | EmbedderSpec, kind: str, builders: Mapping[str, Callable[[Any], Any]]) -> Any:
    if spec.backend == "custom":
        return _call_factory(spec.model)
    if spec.backend not in builders:
        raise ValueError(f"unknown {kind} backend {spec.backend!r}: expected one of {', '.join(builders)} or custom")
    return builders[spec.backend](spec)


def _call_factory(path: str):
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"custom backend needs model='package.module:callable', got {path!r}")
    return getattr(importlib.import_module(module_name), attribute)()


def _gemini_llm(spec: LLMSpec) -> LLM:
    from pipelines.clients.gemini import GeminiLLM

    return GeminiLLM(
        spec.model_name,
        endpoint=_gemini_endpoint(spec),
        concurrency=spec.concurrency,
        max_parse_attempts=spec.max_parse_attempts,
        thinking_budget=spec.thinking_budget,
    )


def _openai_llm(spec: LLMSpec) -> LLM:
    from pipelines.clients.openai_compatible import OpenAICompatibleLLM
    from pipelines.clients.retry import RetryPolicy

    return OpenAICompatibleLLM(
        spec.model_name,
        base_url=spec.base_url,
        timeout_s=spec.timeout_s,
        retry=RetryPolicy(spec.max_attempts, spec.backoff_initial_s, spec.backoff_max_s),
        concurrency=spec.concurrency,
        max_parse_attempts=spec.max_parse_attempts,
        structured_output=spec.structured_output,
    )


def _gemini_embedder(spec: EmbedderSpec) -> Embedder:
    from pipelines.clients.gemini import GeminiEmbedder

    return GeminiEmbedder(spec.model_name, endpoint=_gemini_endpoint(spec), concurrency=spec.concurrency)


def build_batch_client(spec: LLMSpec | EmbedderSpec) -> GeminiBatchClient:
    """The Gemini Batch API client of a spec in batch mode (pipelines/batch_calls.py)."""
    from pipelines.clients.gemini_batch import GeminiBatchClient

    return GeminiBatchClient(spec.model_name, _gemini_endpoint(spec), spec.batch)


def _gemini_endpoint(spec: LLMSpec | EmbedderSpec) -> GeminiEndpoint:
    """What both Gemini backends take from a spec alike: the endpoint, timeout and retry policy."""
    from pipelines.clients.gemini import GeminiEndpoint
    from pipelines.clients.retry import RetryPolicy

    return GeminiEndpoint(
        base_url=spec.base_url,
        api_version=spec.api_version,
        timeout_s=spec.timeout_s,
        retry=RetryPolicy(spec.max_attempts, spec.backoff_initial_s, spec.backoff_max_s),
    )


def _local_llm(spec: LLMSpec) -> LLM:
    from pipelines.clients.local_llm import LocalLLM

    return LocalLLM(spec.model_name, **_local_model(spec))


def _local_embedder(spec: EmbedderSpec) -> Embedder:
    from pipelines.clients.local_embedder import LocalEmbedder

    return LocalEmbedder(
        spec.model_name,
        **_local_model(spec),
        batch_size=spec.batch_size,
        task_prompts=dict(spec.task_prompts),
        max_seq_length=spec.max_seq_length,
    )


def _local_model(spec: LLMSpec | EmbedderSpec) -> dict[str, Any]:
    """What both local backends take from a spec: the torch device, the model cache and the torch threads."""
    return {"device": spec.device, "cache_dir": spec.cache_dir, "torch_threads": spec.torch_threads}


def billable_output_tokens(spec: LLMSpec, answer_tokens: int) -> int:
    """The most output tokens one generate request of `spec` with an answer budget of `answer_tokens` (its
    `GenerationConfig.max_output_tokens`) may be billed for: answer plus thinking on Gemini, the answer elsewhere.

    For budget planners: this, not `answer_tokens`, is a request's worst case.
    """
    if spec.backend != "gemini":
        return answer_tokens
    model = spec.model_name
    return gemini_output_token_limit(model, answer_tokens, gemini_thinking_budget(model, spec.thinking_budget))


# --- identities for cache keys ----------------------------------------------------------------------------------------


def llm_identity(spec: LLMSpec) -> tuple[str, str]:
    """(model id, model version) for cache keys, known without loading the model.

    The version also names the spec's settings that change answers beyond the request itself (the Gemini thinking
    budget), so everything keyed on the identity is keyed on them; settings that do not change an answer (timeouts,
    retries, concurrency, device, threads) stay out, so a re-run with other values still hits the cache.
    """
    if spec.backend == "gemini":
        # Gemini models are versioned by name (gemini-2.5-flash-001 vs -002); the name is the version.
        return spec.model_name, spec.model_name + _thinking_suffix(spec)
    if spec.backend == "openai":
        # A model name says little about what answers: two servers may serve different weights, quantizations or
        # chat templates under one name, so the server is part of the identity.
        return spec.model_name, f"{spec.model_name}@{(spec.base_url or OPENAI_BASE_URL).rstrip('/')}"
    if spec.backend == "custom":
        return spec.model_name, "custom"
    from pipelines.clients.packaged_models import resolve_model

    return spec.model_name, resolve_model(spec.model_name, spec.cache_dir).model_version


def embedder_identity(spec: EmbedderSpec) -> tuple[str, str]:
    """(model id, model version) for cache keys; the version also names a local embedder's `task_prompts`."""
    if spec.backend == "gemini":
        return spec.model_name, spec.model_name
    if spec.backend == "custom":
        return spec.model_name, "custom"
    from pipelines.clients.packaged_models import resolve_model

    version = resolve_model(spec.model_name, spec.cache_dir).model_version
    window = f"+max_seq_length={spec.max_seq_length}" if spec.max_seq_length else ""
    return spec.model_name, version + _task_prompts_suffix(spec) + window


def _thinking_suffix(spec: LLMSpec) -> str:
    """Empty for thinking off on a model where 0 switches it off (what such requests carried before thinking was in the
    key: their cached answers stay valid) and for no thinking config at all; else the budget sent."""
    budget = gemini_thinking_budget(spec.model_name, spec.thinking_budget)
    if budget is None or (budget == 0 and thinking_range(spec.model_name) is not None):
        return ""
    return f"+thinking_budget={budget}"


def _task_prompts_suffix(spec: EmbedderSpec) -> str:
    """Empty without overrides (the model's own prompts are covered by its version), else a hash of the overrides."""
    if not spec.task_prompts:
        return ""
    # As LocalEmbedder reads them: task types by value, a later pair for the same task type winning.
    overrides = sorted({TaskType(task_type).value: prefix for task_type, prefix in spec.task_prompts}.items())
    digest = hashlib.sha256(json.dumps(overrides, ensure_ascii=False).encode()).hexdigest()[:12]
    return f"+task_prompts={digest}"
