"""Gemini's thinking budgets: which budgets a model accepts, the one a request carries, and the max_output_tokens
that keeps the answer's own budget on top of it.

A leaf module: the Gemini backend (pipelines/clients/gemini.py) sends what these rules pick, and the factory
(pipelines/clients/factory.py) keys caches and plans billing on the same picks without importing the backend.
"""

from __future__ import annotations

from dataclasses import dataclass


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
