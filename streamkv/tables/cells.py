"""What a table cell is made of: one result file, as the store hands it over.

The tables never read results/ themselves: the store owns the reuse and stale rules and answers a slot
("main/pg19/lazy") with a `Cell`, or None when no usable result exists. Keeping that boundary means a
table can never silently pick up a result the store would reject.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class Cell:
    slot: str                    # stage/dataset/label, e.g. "main/pg19/lazy"
    metrics: dict                # the result's "metrics" (streamkv.schema.Metrics)
    config_hash: str             # of the result's spec; printed beside every row that uses it
    stale: bool = False          # the spec no longer matches the current plan (ALLOW_STALE_RESULTS=1)
    path: Path | str | None = None  # the result JSON, printed for traceability

    def metric(self, key: str):
        """The metric, or None when the result does not record it."""
        return self.metrics.get(key)


# Answers a slot with its cell, or None when the result is missing (or stale and not allowed).
Lookup = Callable[[str], Optional[Cell]]
