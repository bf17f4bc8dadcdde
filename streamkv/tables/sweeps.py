"""sweeps.tex: one block per swept knob (R, then σ and δ when those sweeps are enabled), long dataset."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cells import Lookup
from .columns import DELTA_PPL, MAX_KEYS, PPL, PRUNES, SPEEDUP, TPOT, headers, result_row
from .layout import Group, Table

if TYPE_CHECKING:
    from . import TablesSpec

COLUMNS = (TPOT, SPEEDUP, PPL, DELTA_PPL, MAX_KEYS, PRUNES)
# knob as it appears in slot names -> as it is printed
KNOBS = (("R", "R"), ("sigma", "σ"), ("delta", "δ"))


def build(lookup: Lookup, spec: "TablesSpec") -> Table:
    ds = spec.long.name
    baseline = f"baselines/{ds}"
    groups = [Group(None, (result_row(lookup, "Baseline (sliding-window recompute)", baseline, baseline,
                                      COLUMNS),))]
    for knob, symbol in KNOBS:
        grid = spec.sweep_grid(knob)
        if grid:
            groups.append(Group(f"Sweep over {symbol}", tuple(
                result_row(lookup, f"{symbol} = {v}", f"sweeps/{ds}/{knob}={v}", baseline, COLUMNS)
                for v in grid)))
    head, align = headers("Setting", COLUMNS)
    caption = (f"Sweeps of Lazy Pruning on {spec.long.display} ({spec.model}, {spec.profile} profile); "
               "each block varies one knob; the KV budget C is the same for every row (auto-cap).")
    return Table("sweeps", "tab:sweeps", caption, head, align, tuple(groups))
