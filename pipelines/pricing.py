"""Estimated cost of LLM calls and teacher embeddings, for the manifest, `--max-cost` and `--dry-run`.

List prices in USD per million tokens (input, output) for paid-tier text, as published on ai.google.dev/pricing for
the models embforge defaults to; local models cost nothing. An unknown Gemini model is estimated at the most expensive
listed rate, so a budget errs on the side of stopping early. A spec's own `usd_per_million_tokens` (from the config)
replaces the table, e.g. for a model behind an OpenAI-compatible server. Requests answered by the Gemini Batch API
cost `BATCH_PRICE_FACTOR` of list. Figures are estimates, not invoices.
"""

from __future__ import annotations

import math
from fractions import Fraction

from pipelines.clients.base import Usage
from pipelines.clients.specs import CallMode, EmbedderSpec, LLMSpec

USD_PER_MILLION_TOKENS: dict[str, tuple[float, float]] = {
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-embedding-001": (0.15, 0.0),
}
_MOST_EXPENSIVE = max(USD_PER_MILLION_TOKENS.values())
#: The Gemini Batch API bills half the online list price, for generation and embeddings alike.
BATCH_PRICE_FACTOR = Fraction(1, 2)


def price_per_million(model: str) -> tuple[float, float]:
    if model in USD_PER_MILLION_TOKENS:
        return USD_PER_MILLION_TOKENS[model]
    if model.startswith("gemini"):
        return _MOST_EXPENSIVE
    return (0.0, 0.0)


def list_price_per_million(spec: LLMSpec | EmbedderSpec) -> tuple[float, float]:
    """The spec's online list price: its configured `usd_per_million_tokens`, else the table's for its model."""
    if spec.usd_per_million_tokens is not None:
        return spec.usd_per_million_tokens
    return price_per_million(spec.model_name)


def is_priced(spec: LLMSpec | EmbedderSpec) -> bool:
    return list_price_per_million(spec) != (0.0, 0.0)


def estimated_cost_micro_usd(spec: LLMSpec | EmbedderSpec, usage: Usage, mode: CallMode | None = None) -> int:
    """Cost in micro-dollars (integers add up exactly across workers) of `usage` sent as `mode` (default: the spec's
    own), rounded up.

    USD per million tokens is micro-USD per token. Prices are taken as exact decimals (0.3, not the float just above
    it) and the result is rounded up, never to the nearest: a sum of estimates is then never below the exact cost, so
    a budget planned with them holds exactly.
    """
    input_price, output_price = list_price_per_million(spec)
    exact = Fraction(str(input_price)) * usage.input_tokens + Fraction(str(output_price)) * usage.output_tokens
    if (mode or spec.mode) == "batch":
        exact *= BATCH_PRICE_FACTOR
    return math.ceil(exact)
