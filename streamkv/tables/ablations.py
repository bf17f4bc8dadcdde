"""ablations.tex: the Lazy Pruning ablation ladder on the long dataset, against its baseline."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cells import Lookup
from .columns import DELTA_PPL, MAX_KEYS, PPL, PRUNES, SPEEDUP, TPOT, headers, result_row
from .layout import Group, Table

if TYPE_CHECKING:
    from . import TablesSpec

COLUMNS = (TPOT, SPEEDUP, PPL, DELTA_PPL, MAX_KEYS, PRUNES)


def build(lookup: Lookup, spec: "TablesSpec") -> Table:
    ds = spec.long.name
    baseline = f"baselines/{ds}"
    reference = Group(None, (result_row(lookup, "Baseline (sliding-window recompute)", baseline, baseline,
                                        COLUMNS),))
    ladder = Group(None, tuple(result_row(lookup, display, f"ablations/{ds}/{label}", baseline, COLUMNS)
                               for label, display in spec.ablations))
    head, align = headers("Variant", COLUMNS)
    caption = (f"Ablations on {spec.long.display} ({spec.model}, {spec.profile} profile). Max keys is the "
               "most keys one query attended to, itself included; prunes counts eviction events.")
    return Table("ablations", "tab:ablations", caption, head, align, (reference, ladder))
