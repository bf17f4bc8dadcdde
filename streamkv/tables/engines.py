"""engines.tex: TPOT of the decode engines with and without eviction, and the eviction overhead.

One row per engine of the bench's engine comparison (the bench stage's rows): the seed's style of decoding
(HF forward with a DynamicCache re-sliced at every prune) and the ring-buffer engine, on the same tokens.
Eviction overhead = TPOT with eviction / TPOT of the same engine without eviction (R = 0, the cache
growing from C): it isolates what pruning costs each engine. No rows (RUN_MIT_BENCH=0): no table.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cells import Lookup
from .columns import TPOT, shared, trace
from .layout import INSERT, Entry, Group, Row, Table

if TYPE_CHECKING:
    from . import EngineRow, TablesSpec


def _overhead(cell, reference) -> Entry:
    if cell is None or reference is None:
        return Entry(INSERT)
    mine, base = cell.metric("tpot_ms"), reference.metric("tpot_ms")
    if not mine or not base:
        return Entry(INSERT)
    stale = ("stale",) if cell.stale or reference.stale else ()
    return Entry(format(mine / base, ".3f"), stale + shared(cell, reference))


def _tpot(cell) -> Entry:
    return Entry(INSERT) if cell is None else TPOT.compute(cell, None)


def _row(lookup: Lookup, row: "EngineRow") -> Row:
    reference = lookup(row.no_eviction.slot)
    entries = [Entry(row.engine), _tpot(reference)]
    for line in row.lines:
        cell = lookup(line.slot)
        entries += [_tpot(cell), _overhead(cell, reference)]
    traces = "; ".join(trace(line.slot, lookup(line.slot)) for line in (row.no_eviction, *row.lines))
    return Row(tuple(entries), traces)


def build(lookup: Lookup, spec: "TablesSpec") -> Table | None:
    rows = spec.rows.get("bench", ())
    if not rows:
        return None
    first = rows[0]
    headers = ["Engine", first.no_eviction.display]
    for line in first.lines:
        headers += [line.display, "Overhead"]
    datasets = ", ".join(dict.fromkeys(r.dataset for r in rows))
    caption = (f"Decode engines on the same tokens of {datasets} (prefill C, then the bench's decoded tokens): "
               "TPOT in ms as median ± half range over the timed repeats, and eviction overhead (×) = TPOT with "
               "eviction / TPOT of the same engine without eviction.")
    return Table("engines", "tab:engines", caption, tuple(headers), ("l",) + ("r",) * (len(headers) - 1),
                 (Group(None, tuple(_row(lookup, r) for r in rows)),))
