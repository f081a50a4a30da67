"""Estimated LLM cost per call, for the manifest and `--max-cost`.

List prices in USD per million tokens (input, output) for paid-tier text, as published on ai.google.dev/pricing for
the models embforge defaults to; local models cost nothing. An unknown API model is estimated at the most expensive
listed rate, so a budget errs on the side of stopping early. Figures are estimates, not invoices.
"""

from __future__ import annotations

from pipelines.clients.base import Usage

USD_PER_MILLION_TOKENS: dict[str, tuple[float, float]] = {
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-embedding-001": (0.15, 0.0),
}
_MOST_EXPENSIVE = max(USD_PER_MILLION_TOKENS.values())


def price_per_million(model: str) -> tuple[float, float]:
    if model in USD_PER_MILLION_TOKENS:
        return USD_PER_MILLION_TOKENS[model]
    if model.startswith("gemini"):
        return _MOST_EXPENSIVE
    return (0.0, 0.0)


def estimated_cost_micro_usd(model: str, usage: Usage) -> int:
    """Cost in micro-dollars (integers add up exactly across workers)."""
    input_price, output_price = price_per_million(model)
    return round(usage.input_tokens * input_price + usage.output_tokens * output_price)
