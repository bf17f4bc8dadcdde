"""sweeps.tex: one block per swept knob (R, then σ and δ when those sweeps are enabled), long dataset."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cells import Lookup
from .columns import DELTA_PPL, MAX_KEYS, PPL, PRUNES, SPEEDUP, TPOT, baseline_row, block_rows, headers
from .layout import Group, Table

if TYPE_CHECKING:
    from . import TablesSpec

COLUMNS = (TPOT, SPEEDUP, PPL, DELTA_PPL, MAX_KEYS, PRUNES)


def build(lookup: Lookup, spec: "TablesSpec") -> Table:
    blocks = spec.rows.get("sweeps", ())
    groups = [Group(None, (baseline_row(lookup, blocks[0], COLUMNS),))] if blocks else []
    groups += [Group(f"Sweep over {block.title}", block_rows(lookup, block, COLUMNS)) for block in blocks]
    head, align = headers("Setting", COLUMNS)
    caption = (f"Sweeps of Lazy Pruning on {spec.long.display} ({spec.model}, {spec.profile} profile); "
               "each block varies one knob; the KV budget C is the same for every row (auto-cap).")
    return Table("sweeps", "tab:sweeps", caption, head, align, tuple(groups))
