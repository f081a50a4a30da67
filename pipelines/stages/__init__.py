"""Pipeline stages: one module, one public PTransform each.

Conventions every stage follows, so the run can account for every row:
- `expand` returns `{"kept": PCollection, "rejected": PCollection, "tallies": PCollection}` (plus stage-specific
  extras where documented).
- Rejected rows are built with `rejected_row` and match `data_schemas.REJECTED`; `reason` is a short snake_case code
  that the manifest aggregates, `detail` the human sentence.
- A stage counts its input, kept, rejected (by reason) and skipped rows where they cross its boundary, and its
  fan-out (`expanded`) where it happens, through pipelines/accounting.py, which feeds both the Beam metrics (namespace
  `embforge.<stage>`) and the stage's "tallies" for the manifest.
"""

from __future__ import annotations

import json
from typing import Any

import apache_beam as beam

__all__ = ["rejected_row", "route"]


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


def route(outcome: str, row: dict[str, Any]) -> Any:
    """A ("kept" | "rejected", row) outcome as a DoFn output: the row itself, or tagged "rejected"."""
    return row if outcome == "kept" else beam.pvalue.TaggedOutput("rejected", row)
