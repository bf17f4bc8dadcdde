"""negative_results.tex: the guide's qualitative negative results, from negative_results.json beside this file.

The rows are prose kept in a data file so that they can be corrected without touching code; no result file
feeds this table, and it carries no numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .cells import Lookup
from .layout import Entry, Group, Row, Table

if TYPE_CHECKING:
    from . import TablesSpec

DATA = Path(__file__).with_name("negative_results.json")
FIELDS = (("approach", "Approach", 2.3), ("tried", "What was tried", 3.4),
          ("outcome", "Observed outcome", 3.4), ("excluded", "Why excluded", 3.0))   # key, header, width cm


def build(lookup: Lookup, spec: "TablesSpec", data: Path = DATA) -> Table:
    rows = json.loads(data.read_text(encoding="utf-8"))["rows"]
    body = tuple(Row(tuple(Entry(r[key]) for key, _, _ in FIELDS), f"source={data.name} row={i}")
                 for i, r in enumerate(rows))
    caption = ("Negative results, qualitative only, as reported by the original project's guide. "
               "None was re-measured in this bundle, so no numbers are given.")
    return Table("negative_results", "tab:negative", caption, tuple(h for _, h, _ in FIELDS),
                 tuple(rf">{{\raggedright\arraybackslash}}p{{{w}cm}}" for _, _, w in FIELDS), (Group(None, body),))
