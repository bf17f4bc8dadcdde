"""What a table cell is made of: one result file, as the store hands it over.

The tables never read results/ themselves: the store owns the reuse and stale rules and answers a slot
("main/pg19/lazy") with a `streamkv.store.Cell`, or None when no usable result exists. Keeping that
boundary means a table can never silently pick up a result the store would reject.
"""
from __future__ import annotations

from typing import Callable, Optional

from ..store import Cell

__all__ = ["Cell", "Lookup"]

# Answers a slot with its cell, or None when the result is missing (or stale and not allowed).
Lookup = Callable[[str], Optional[Cell]]
