"""The one accounting path: a StageTally call feeds the Beam counter and the manifest tally together, and CountRows
counts a stage's rows as they cross its boundary, so a row lost inside the stage shows."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.accounting import TALLIES, CountingDoFn, CountRows, StageTally, sum_tallies


class _ParityFn(CountingDoFn):
    """Keeps even numbers, rejects odd ones as `odd`; every number is one input row."""

    def __init__(self):
        super().__init__("parity")

    def process(self, number: int):
        self.tally.count("input")
        if number % 2:
            self.tally.reject("odd")
            yield beam.pvalue.TaggedOutput("rejected", {"reason": "odd", "number": number})
        else:
            self.tally.count("kept")
            yield {"number": number}


def _tallies(outputs) -> dict:
    return {output.value.value[0]: output.value.value[1] for output in outputs}


def test_the_dofn_lifecycle_counts_a_bundle_and_emits_its_tallies_when_it_ends():
    fn = _ParityFn()
    outputs = [output for number in (1, 2, 3, 4, 6) for output in fn.process(number)]
    assert [output["number"] for output in outputs if not isinstance(output, beam.pvalue.TaggedOutput)] == [2, 4, 6]
    assert [output.tag for output in outputs if isinstance(output, beam.pvalue.TaggedOutput)] == ["rejected"] * 2
    ended = list(fn.finish_bundle())
    assert {output.tag for output in ended} == {TALLIES}
    assert _tallies(ended) == {("stage", "parity", "input"): 5, ("stage", "parity", "kept"): 3,
                               ("reason", "parity", "odd"): 2}
    assert list(fn.finish_bundle()) == []  # the next bundle starts from zero


def test_statistics_and_usage_tallies_go_beside_the_row_counts():
    tally = StageTally("mine")
    tally.statistic("mining", "hits", 3)
    tally.statistic("mining", "relabeled", 0)  # a zero statistic is not reported
    tally.add(("cache", "llm_hits"), 0)  # a zero usage tally is: the manifest lists it
    tally.count("expanded", 2)
    assert _tallies(tally.flush()) == {("mining", "hits"): 3, ("cache", "llm_hits"): 0,
                                       ("stage", "mine", "expanded"): 2}


def test_an_unknown_row_field_is_refused():
    with pytest.raises(ValueError, match="unknown row field 'kep'"):
        StageTally("x").count("kep")
    with pytest.raises(ValueError, match="unknown row field 'rejects'"):
        CountRows("x", "rejects")


@pytest.mark.slow
def test_rows_counted_at_the_boundary_pass_through_and_a_lost_row_unbalances_the_stage():
    with TestPipeline() as pipeline:
        entering = pipeline | beam.Create(range(6)) | "CountInput" >> CountRows("lossy", "input")
        # A buggy step between the boundaries drops the number 5 without a rejection.
        rows = entering["rows"] | beam.Filter(lambda number: number != 5)
        kept = rows | "Even" >> beam.Filter(lambda number: number % 2 == 0) | "CountKept" >> CountRows("lossy", "kept")
        rejected = (rows | "Odd" >> beam.Filter(lambda number: number % 2) | beam.Map(lambda n: {"reason": "odd"})
                    | "CountRejected" >> CountRows("lossy", "rejected"))
        assert_that(kept["rows"], equal_to([0, 2, 4]), label="PassedThrough")
        tallies = sum_tallies((entering["tallies"], kept["tallies"], rejected["tallies"]))
        assert_that(tallies, equal_to([(("stage", "lossy", "input"), 6), (("stage", "lossy", "kept"), 3),
                                       (("reason", "lossy", "odd"), 2)]), label="Tallies")


@pytest.mark.slow
def test_one_call_feeds_the_beam_counter_and_the_summed_manifest_tally():
    pipeline = TestPipeline()
    counted = pipeline | beam.Create(range(10)) | beam.ParDo(_ParityFn()).with_outputs("rejected", TALLIES,
                                                                                       main="kept")
    assert_that(sum_tallies((counted[TALLIES],)), equal_to([
        (("stage", "parity", "input"), 10), (("stage", "parity", "kept"), 5), (("reason", "parity", "odd"), 5)]))
    result = pipeline.run()
    result.wait_until_finish()
    counters = {counter.key.metric.name: counter.committed
                for counter in result.metrics().query(MetricsFilter().with_namespace("embforge.parity"))["counters"]}
    assert counters == {"input": 10, "kept": 5, "rejected": 5, "rejected.odd": 5}
