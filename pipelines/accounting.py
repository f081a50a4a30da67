"""One accounting path for every stage's rows, as datatrove counts them in its base pipeline step.

Every count goes through a `StageTally`. One call feeds both places a count is read: it increments the Beam counter
`embforge.<stage>/<name>` (what a runner's UI shows while the run goes) and adds to the manifest tallies,
`((kind, stage, field), count)` elements that WriteShards sums into manifest.json. The tallies are held per bundle
and emitted on the `TALLIES` output when the bundle ends (`finish_bundle`), so counting adds a few elements per
bundle, not one per row. Each stage returns its tallies summed (`sum_tallies`); run.py only flattens them.

A stage counts its rows where they cross its boundary (`CountRows`): its input as it enters, its kept, rejected (by
reason) and skipped rows as they leave. So a row a stage loses on the way, without a rejection, unbalances the manifest
(input + expanded = kept + rejected + skipped) and fails the run, whatever step lost it. Inside, DoFns count only what
is not a row: the fan-out (`expanded`), statistics, model usage; and the input of a root stage, where rows come into
being.

Tally keys (data_schemas/manifest.py reads them through WriteShards' `assemble_manifest`): ("stage", stage, field)
for input / kept / expanded / skipped; ("reason", stage, reason) for rejections; ("llm", stage, field),
("embedding", stage, field), ("cost", stage), ("cache", name) for model usage; ("mining", name) for mining statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

#: The tagged output a counting DoFn emits its tallies on.
TALLIES = "tallies"
#: Counted row fields of a stage: input + expanded = kept + rejected + skipped (`data_schemas.stage_balances`).
ROW_FIELDS = ("input", "kept", "expanded", "skipped")


class StageTally:
    """The counts of one stage's DoFn: each call increments the Beam counter and the manifest tally together. The
    tallies are summed over the bundle and emitted when it ends (`flush`)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.namespace = f"embforge.{stage}"
        self._pending: dict[tuple[str, ...], int] = {}

    def add(self, key: tuple[str, ...], count: int = 1) -> None:
        """Add `count` to any manifest tally; a zero still reports the key (the manifest lists every usage it has
        seen)."""
        self._pending[key] = self._pending.get(key, 0) + count

    def flush(self) -> Iterator[beam.pvalue.TaggedOutput]:
        """The bundle's tallies as `finish_bundle` outputs on TALLIES. The pipeline runs in the global window, so that
        is where they go."""
        window = GlobalWindow()
        for key, count in self._pending.items():
            yield beam.pvalue.TaggedOutput(TALLIES, WindowedValue((key, count), window.max_timestamp(), (window,)))
        self._pending = {}

    def _metric(self, name: str, count: int) -> None:
        beam.metrics.Metrics.counter(self.namespace, name).inc(count)

    def count(self, field: str, count: int = 1) -> None:
        """`count` more rows of `field` (one of ROW_FIELDS)."""
        if field not in ROW_FIELDS:
            raise ValueError(f"{self.stage}: unknown row field {field!r} (known: {', '.join(ROW_FIELDS)})")
        self._metric(field, count)
        self.add(("stage", self.stage, field), count)

    def reject(self, reason: str, count: int = 1) -> None:
        self._metric("rejected", count)
        self._metric(f"rejected.{reason}", count)
        self.add(("reason", self.stage, reason), count)

    def statistic(self, kind: str, name: str, count: int) -> None:
        """A tally outside the row balance (a mining statistic, say), also counted as Beam counter `name`."""
        if count:
            self._metric(name, count)
            self.add((kind, name), count)


class CountingDoFn(beam.DoFn):
    """A DoFn that counts through `self.tally` and emits the bundle's tallies on `TALLIES` when the bundle ends.
    Apply it `.with_outputs(TALLIES, ...)`."""

    def __init__(self, stage: str):
        self.tally = StageTally(stage)

    def finish_bundle(self) -> Iterator[Any]:
        yield from self.tally.flush()


class _CountRowsFn(CountingDoFn):
    def __init__(self, stage: str, field: str):
        super().__init__(stage)
        self._field = field

    def process(self, row: Any) -> Iterator[Any]:
        if self._field == "rejected":
            self.tally.reject(row["reason"])
        else:
            self.tally.count(self._field)
        yield row


class CountRows(beam.PTransform):
    """rows -> {"rows": the same rows, "tallies": each counted as `field` of `stage` ("rejected": by its reason)}.

    Fused with the steps around it, it costs one function call a row, no shuffle.
    """

    def __init__(self, stage: str, field: str):
        super().__init__()
        if field not in (*ROW_FIELDS, "rejected"):
            raise ValueError(f"{stage}: unknown row field {field!r} (known: {', '.join(ROW_FIELDS)}, rejected)")
        self._stage = stage
        self._field = field

    def expand(self, rows):
        counted = rows | "Count" >> beam.ParDo(_CountRowsFn(self._stage, self._field)).with_outputs(
            TALLIES, main="rows")
        return {"rows": counted["rows"], "tallies": counted[TALLIES]}


def sum_tallies(parts, label: str = "SumTallies"):
    """The stage's tally PCollections -> one, summed per key (a handful of elements for WriteShards)."""
    return tuple(parts) | f"{label}Flatten" >> beam.Flatten() | label >> beam.CombinePerKey(sum)
