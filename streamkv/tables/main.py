"""tables.tex: the main results, long and short dataset, baseline vs Start+Recent vs Lazy Pruning."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cells import Lookup
from .columns import DELTA_PPL, MEMORY, PPL, SPEEDUP, TPOT, headers, result_row
from .layout import Group, Table

if TYPE_CHECKING:
    from . import TablesSpec

COLUMNS = (TPOT, SPEEDUP, PPL, DELTA_PPL, MEMORY)


def build(lookup: Lookup, spec: "TablesSpec") -> Table:
    groups = []
    for ds in (spec.long, spec.short):
        baseline = f"baselines/{ds.name}"
        rows = (
            result_row(lookup, "Baseline (sliding-window recompute)", baseline, baseline, COLUMNS),
            result_row(lookup, "Start+Recent (strict, R = 1)", f"main/{ds.name}/strict", baseline, COLUMNS),
            result_row(lookup, f"Lazy Pruning (R = {spec.lazy_r})", f"main/{ds.name}/lazy", baseline, COLUMNS),
        )
        groups.append(Group(ds.display, rows))
    head, align = headers("Method", COLUMNS)
    caption = (f"Main results: {spec.model}, {spec.profile} profile, KV budget C = {spec.cap_total} tokens "
               f"with {spec.n_sink} sinks. TPOT is decode time per token; speedup and ΔPPL are relative to "
               "the sliding-window-recompute baseline on the same tokens. Memory is the peak CUDA memory.")
    return Table("tables", "tab:main", caption, head, align, tuple(groups))
