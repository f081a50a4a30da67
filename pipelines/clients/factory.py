"""The factories that build clients from specs (pipelines/clients/specs.py), and what a spec implies: model identities
for cache keys, Gemini thinking budgets and billable output tokens.

DoFns keep a spec and call `build_llm` / `build_embedder` in `setup()`, so no client or model is ever pickled.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass

from pipelines.clients.base import LLM, Embedder, TaskType
from pipelines.clients.specs import EmbedderSpec, LLMSpec


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


# --- Gemini thinking --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThinkingRange:
    """The thinking budgets (tokens) a Gemini model accepts, besides -1 (dynamic thinking)."""

    #: Whether 0 switches thinking off; where it cannot, the model always thinks at least `minimum` tokens.
    can_switch_off: bool
    minimum: int
    maximum: int


#: Gemini 2.5's thinking budgets (ai.google.dev/gemini-api/docs/thinking). Other models get no thinking config unless
#: `LLMSpec.thinking_budget` is given.
GEMINI_THINKING: dict[str, ThinkingRange] = {
    "gemini-2.5-flash": ThinkingRange(True, 1, 24576),
    "gemini-2.5-flash-lite": ThinkingRange(True, 512, 24576),
    "gemini-2.5-pro": ThinkingRange(False, 128, 32768),
}
DYNAMIC_THINKING = -1


def thinking_range(model: str) -> ThinkingRange | None:
    """The range of `model` (`models/` prefix and `-preview-...` suffix allowed), None for models not in the table."""
    name = model.rsplit("/", 1)[-1]
    for known, budgets in GEMINI_THINKING.items():
        if name == known or name.startswith(f"{known}-preview"):
            return budgets
    return None


def gemini_thinking_budget(model: str, requested: int | None) -> int | None:
    """The thinking budget a request to `model` carries: `requested` when given (checked against the model's range),
    else 0 (thinking off) where the model allows it, else its minimum; None (no thinking config: the model's own
    default) for a model outside `GEMINI_THINKING` when none is requested.

    Short JSON answers need no thinking, and thinking tokens are billed as output.
    """
    budgets = thinking_range(model)
    if requested is None:
        if budgets is None:
            return None
        return 0 if budgets.can_switch_off else budgets.minimum
    if requested == DYNAMIC_THINKING:
        if budgets is None:
            raise ValueError(
                f"thinking_budget=-1 (dynamic) for {model!r}: its maximum thinking budget is unknown "
                f"(known models: {sorted(GEMINI_THINKING)}), so the answer's tokens could not be kept "
                "apart from it; give a budget in tokens"
            )
        return requested
    if requested < 0:
        raise ValueError(f"thinking_budget must be -1 (dynamic), 0 (off) or a number of tokens, got {requested}")
    if budgets is not None:
        allowed = f"{budgets.minimum}..{budgets.maximum} or -1 (dynamic)"
        if requested == 0 and not budgets.can_switch_off:
            raise ValueError(
                f"{model} cannot switch thinking off: thinking_budget must be {allowed}, or unset "
                f"for its minimum ({budgets.minimum})"
            )
        if requested != 0 and not budgets.minimum <= requested <= budgets.maximum:
            off = "0 (off), " if budgets.can_switch_off else ""
            raise ValueError(f"{model}: thinking_budget must be {off}{allowed}, got {requested}")
    return requested


def gemini_output_token_limit(model: str, answer_tokens: int, thinking_budget: int | None) -> int:
    """The max_output_tokens to send: the answer's budget plus the thinking budget (dynamic thinking: the model's
    maximum), because Gemini 2.5 counts thinking tokens inside max_output_tokens. So thinking never eats the answer's
    tokens, and this is also the most output tokens one request can be billed for (thinking is billed as output).

    `thinking_budget` is what `gemini_thinking_budget` returned; None (no thinking config) adds nothing.
    """
    if thinking_budget is None:
        return answer_tokens
    if thinking_budget == DYNAMIC_THINKING:
        budgets = thinking_range(model)
        if budgets is None:
            raise ValueError(f"dynamic thinking for {model!r}: its maximum thinking budget is unknown")
        return answer_tokens + budgets.maximum
    return answer_tokens + thinking_budget


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
