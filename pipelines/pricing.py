"""Estimated cost of LLM calls and teacher embeddings, for the manifest and `--max-cost`.

List prices in USD per million tokens (input, output) for paid-tier text, as published on ai.google.dev/pricing for
the models embforge defaults to; local models cost nothing. An unknown API model is estimated at the most expensive
listed rate, so a budget errs on the side of stopping early. Figures are estimates, not invoices.
"""

from __future__ import annotations

import math
from fractions import Fraction

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
    """Cost in micro-dollars (integers add up exactly across workers), rounded up.

    USD per million tokens is micro-USD per token. Prices are taken as exact decimals (0.3, not the float just above
    it) and the result is rounded up, never to the nearest: a sum of estimates is then never below the exact cost, so
    a budget planned with them holds exactly.
    """
    input_price, output_price = price_per_million(model)
    exact = Fraction(str(input_price)) * usage.input_tokens + Fraction(str(output_price)) * usage.output_tokens
    return math.ceil(exact)
