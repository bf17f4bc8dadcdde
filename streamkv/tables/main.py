"""tables.tex: the main results, long and short dataset, baseline vs Start+Recent vs Lazy Pruning."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cells import Lookup
from .columns import DELTA_PPL, MEMORY, PPL, SPEEDUP, TPOT, block_rows, headers
from .layout import Group, Table

if TYPE_CHECKING:
    from . import TablesSpec

COLUMNS = (TPOT, SPEEDUP, PPL, DELTA_PPL, MEMORY)


def build(lookup: Lookup, spec: "TablesSpec") -> Table:
    groups = tuple(Group(block.title, block_rows(lookup, block, COLUMNS, with_baseline=True))
                   for block in spec.rows["main"])
    head, align = headers("Method", COLUMNS)
    caption = (f"Main results: {spec.model}, {spec.profile} profile, KV budget C = {spec.cap_total} tokens "
               f"with {spec.n_sink} sinks. TPOT is decode time per token; speedup and ΔPPL are relative to "
               "the sliding-window-recompute baseline on the same tokens. Memory is the peak CUDA memory.")
    return Table("tables", "tab:main", caption, head, align, groups)
