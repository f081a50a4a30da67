"""Prices: the table by model name, a spec's configured price, the Batch API's half price, rounding up."""

from __future__ import annotations

from pipelines.clients.base import Usage
from pipelines.clients.specs import EmbedderSpec, LLMSpec
from pipelines.pricing import estimated_cost_micro_usd, is_priced, list_price_per_million

MILLION = Usage(1_000_000, 1_000_000)


def test_a_listed_model_costs_its_list_price_and_a_local_one_nothing():
    assert estimated_cost_micro_usd(LLMSpec(backend="gemini", model="gemini-2.5-flash"), MILLION) == 2_800_000
    assert estimated_cost_micro_usd(LLMSpec(), MILLION) == 0
    assert not is_priced(EmbedderSpec()) and is_priced(EmbedderSpec(backend="gemini"))


def test_an_unknown_gemini_model_is_priced_at_the_most_expensive_rate():
    assert list_price_per_million(LLMSpec(backend="gemini", model="gemini-9-ultra")) == (1.25, 10.0)


def test_a_configured_price_replaces_the_table():
    spec = LLMSpec(backend="gemini", model="gemini-2.5-flash", usd_per_million_tokens=(1.0, 2.0))
    assert estimated_cost_micro_usd(spec, MILLION) == 3_000_000
    assert is_priced(LLMSpec(model="my-model", usd_per_million_tokens=(0.0, 0.1)))


def test_batch_mode_costs_half_of_list_and_the_mode_can_be_asked_for_explicitly():
    online = LLMSpec(backend="gemini", model="gemini-2.5-flash")
    batch = LLMSpec(backend="gemini", model="gemini-2.5-flash", mode="batch")
    assert estimated_cost_micro_usd(batch, MILLION) == 1_400_000
    assert estimated_cost_micro_usd(online, MILLION, mode="batch") == 1_400_000
    # A batch request asked again online (a failed line) pays list price.
    assert estimated_cost_micro_usd(batch, MILLION, mode="online") == 2_800_000


def test_costs_round_up_to_whole_micro_dollars():
    # 10 input tokens at $0.15 per million: 1.5 micro-USD -> 2; in batch mode 0.75 -> 1.
    embedder = EmbedderSpec(backend="gemini")
    assert estimated_cost_micro_usd(embedder, Usage(10, 0)) == 2
    assert estimated_cost_micro_usd(embedder, Usage(10, 0), mode="batch") == 1
