"""Pipeline stages: one module, one public PTransform each.

Conventions every stage follows, so `run.py` can account for every row:
- `expand` returns `{"kept": PCollection, "rejected": PCollection}` (plus stage-specific extras where documented).
- Rejected rows are built with `rejected_row` and match `data_schemas.REJECTED`; `reason` is a short snake_case code
  that the manifest aggregates, `detail` the human sentence.
- DoFns count in Beam metrics under namespace `embforge.<stage>`: `input`, `kept`, `rejected` and
  `rejected.<reason>`, through `StageCounters`.
"""

from __future__ import annotations

import json
from typing import Any

import apache_beam as beam

__all__ = ["StageCounters", "rejected_row"]


def rejected_row(
    stage: str,
    reason: str,
    payload: Any,
    *,
    record_id: str | None = None,
    raw_answer: str | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    """A row for `rejected/`: the stage, why, and the whole rejected record so nothing is lost."""
    if isinstance(payload, (bytes, bytearray)):
        # Undecodable input is kept byte-exact, escaped, so the row itself stays valid UTF-8.
        payload_text = json.dumps({"raw_bytes": bytes(payload).decode("latin-1")})
    elif isinstance(payload, str):
        payload_text = payload
    else:
        payload_text = json.dumps(payload, ensure_ascii=False, default=str, sort_keys=True)
    return {
        "stage": stage,
        "reason": reason,
        "record_id": record_id,
        "payload": payload_text,
        "raw_answer": raw_answer,
        "detail": detail,
    }


class StageCounters:
    """Beam metrics for one stage: input, kept, rejected and rejected.<reason>."""

    def __init__(self, stage: str):
        self.namespace = f"embforge.{stage}"
        self.input = beam.metrics.Metrics.counter(self.namespace, "input")
        self.kept = beam.metrics.Metrics.counter(self.namespace, "kept")
        self.rejected = beam.metrics.Metrics.counter(self.namespace, "rejected")

    def reject(self, reason: str) -> None:
        self.rejected.inc()
        beam.metrics.Metrics.counter(self.namespace, f"rejected.{reason}").inc()

    def route(self, outcome: str, row: dict[str, Any]) -> Any:
        """Count a ("kept" | "rejected", row) outcome; return the row for the main output, or tagged "rejected"."""
        if outcome == "kept":
            self.kept.inc()
            return row
        self.reject(row["reason"])
        return beam.pvalue.TaggedOutput("rejected", row)
