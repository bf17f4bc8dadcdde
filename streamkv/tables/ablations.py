"""ablations.tex: the Lazy Pruning ablation ladder on the long dataset, against its baseline."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cells import Lookup
from .columns import DELTA_PPL, MAX_KEYS, PPL, PRUNES, SPEEDUP, TPOT, baseline_row, block_rows, headers
from .layout import Group, Table

if TYPE_CHECKING:
    from . import TablesSpec

COLUMNS = (TPOT, SPEEDUP, PPL, DELTA_PPL, MAX_KEYS, PRUNES)


def build(lookup: Lookup, spec: "TablesSpec") -> Table:
    block = spec.rows.get("ablations")
    groups = () if block is None else (Group(None, (baseline_row(lookup, block, COLUMNS),)),
                                       Group(None, block_rows(lookup, block, COLUMNS)))
    head, align = headers("Variant", COLUMNS)
    caption = (f"Ablations on {spec.long.display} ({spec.model}, {spec.profile} profile). Max keys is the "
               "most keys one query attended to, itself included; prunes counts eviction events. H2O and TOVA "
               "keep the sinks and half of the remaining budget as a recent window, the other half by "
               "attention score, pruned at the same R.")
    return Table("ablations", "tab:ablations", caption, head, align, groups)
