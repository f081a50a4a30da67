"""Run a DoFn through its lifecycle as a runner would (setup, start_bundle, process per element, finish_bundle,
teardown) and sort what it yields: main output, tagged outputs by tag, and the tallies emitted when the bundle ends."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from pipelines.accounting import TALLIES


@dataclass
class DoFnOutputs:
    main: list[Any] = field(default_factory=list)
    #: Tag -> values, in the order yielded (TALLIES excluded: see `tallies`).
    tagged: dict[str, list[Any]] = field(default_factory=dict)
    #: The bundle's tallies, summed per key.
    tallies: dict[tuple[str, ...], int] = field(default_factory=dict)

    def reasons(self, tag: str = "rejected") -> list[str]:
        return [row["reason"] for row in self.tagged.get(tag, [])]


def _sort(outputs: DoFnOutputs, output: Any, *, in_finish_bundle: bool) -> None:
    tag = output.tag if isinstance(output, beam.pvalue.TaggedOutput) else None
    value = output.value if tag is not None else output
    if in_finish_bundle:
        # A runner needs a window for what finish_bundle emits: no element is in flight to lend one.
        assert isinstance(value, WindowedValue), f"finish_bundle yielded {value!r} without a window"
        value = value.value
    if tag == TALLIES:
        key, count = value
        outputs.tallies[key] = outputs.tallies.get(key, 0) + count
    elif tag is None:
        outputs.main.append(value)
    else:
        outputs.tagged.setdefault(tag, []).append(value)


def run_dofn(fn: beam.DoFn, elements: Iterable[Any], *side_inputs: Any) -> DoFnOutputs:
    """One bundle of `elements` through `fn`; `side_inputs` are passed to every `process` call after the element."""
    outputs = DoFnOutputs()
    fn.setup()
    fn.start_bundle()
    for element in elements:
        for output in fn.process(element, *side_inputs) or ():
            _sort(outputs, output, in_finish_bundle=False)
    for output in fn.finish_bundle() or ():
        _sort(outputs, output, in_finish_bundle=True)
    fn.teardown()
    return outputs
