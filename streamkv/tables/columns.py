"""Metric columns and the one function that turns a result slot into a table row.

The main, ablation and sweep tables all show results against the fixed recompute baseline of the same
dataset, so they share this module: a column is a header plus a function of (cell, baseline cell). Number
formats live here only, which keeps every table consistent (PPL 3 decimals, milliseconds 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .cells import Cell, Lookup
from .layout import INSERT, UNRECORDED, Entry, Row

if TYPE_CHECKING:
    from . import Block

BYTES_PER_MB = 2 ** 20     # the convention of torch.cuda.max_memory_allocated() / 2**20


@dataclass(frozen=True)
class Column:
    header: str
    compute: Callable[[Cell, Cell | None], Entry]   # (result, its dataset's baseline or None) -> entry
    align: str = "r"


def _number(value, fmt: str, marks: tuple[str, ...] = ()) -> Entry:
    if value is None:
        return Entry(UNRECORDED, ("unrecorded",))
    return Entry(format(value, fmt), marks)


def _own(key: str, fmt: str) -> Callable[[Cell, Cell | None], Entry]:
    return lambda cell, base: _number(cell.metric(key), fmt)


def shared(*cells: Cell | None) -> tuple[str, ...]:
    """The "shared" note for a timing derived from these cells when any was timed beside other workers."""
    return ("shared",) if any(c is not None and c.timed_on_shared_device for c in cells) else ()


def _against_baseline(combine: Callable[[float, float], float | None], key: str, fmt: str, *, timed: bool = False):
    """A value derived from the result and its baseline; a stale baseline makes the derived value stale, and
    a timing (`timed`) taken on a shared GPU, by either, marks it too."""
    def compute(cell: Cell, base: Cell | None) -> Entry:
        if base is None:
            return Entry(INSERT)
        mine, ref = cell.metric(key), base.metric(key)
        value = None if mine is None or ref is None else combine(mine, ref)
        stale = ("stale",) if base.stale else ()
        return _number(value, fmt, stale + (shared(cell, base) if timed else ()))
    return compute


def _memory(cell: Cell, base: Cell | None) -> Entry:
    """Peak CUDA memory over the phases when measured, else the analytic KV-cache size (marked)."""
    peak = cell.metric("peak_memory_mb")
    if peak:
        return _number(max(peak.values()), ".1f")
    kv_bytes = cell.metric("kv_cache_bytes")
    return _number(None if kv_bytes is None else kv_bytes / BYTES_PER_MB, ".1f", ("kv",))


def _median_spread(cell: Cell, base: Cell | None) -> Entry:
    """TPOT as "median ± spread" over the timed repeats (streamkv/timing.py); the median alone when one
    repeat was timed."""
    median, spread = cell.metric("tpot_ms"), cell.metric("tpot_ms_spread")
    if median is None or not spread:
        return _number(median, ".2f", shared(cell))
    return Entry(f"{median:.2f} ± {spread:.2f}", shared(cell))


TPOT = Column("TPOT (ms)", _median_spread)
# A zero TPOT (a broken result) has no speedup; it must not crash `make tex`.
SPEEDUP = Column("Speedup (×)", _against_baseline(lambda mine, ref: ref / mine if mine else None, "tpot_ms", ".2f",
                                                  timed=True))
PPL = Column("PPL", _own("perplexity", ".3f"))
DELTA_PPL = Column("ΔPPL", _against_baseline(lambda mine, ref: mine - ref, "perplexity", "+.3f"))
MEMORY = Column("Memory (MB)", _memory)
MAX_KEYS = Column("Max keys", _own("max_visible_tokens", "d"))
PRUNES = Column("Prunes", _own("n_prunes", "d"))


def _shown(path) -> str:
    """The result file relative to the working directory (the repository root) when it lies below it, so
    generated files do not depend on where the checkout sits."""
    p = Path(path)
    if p.is_absolute() and p.is_relative_to(Path.cwd()):
        return str(p.relative_to(Path.cwd()))
    return str(p)


def trace(slot: str, cell: Cell | None) -> str:
    if cell is None:
        return f"slot={slot} missing"
    where = f" file={_shown(cell.path)}" if cell.path is not None else ""
    stale = " stale" if cell.stale else ""
    return f"slot={slot} config_hash={cell.config_hash}{where}{stale}"


def result_row(lookup: Lookup, label: str, slot: str, baseline_slot: str,
               columns: tuple[Column, ...]) -> Row:
    """One row: the result in `slot` against the baseline in `baseline_slot`; INSERT DATA when missing."""
    cell = lookup(slot)
    if cell is None:
        return Row((Entry(label),) + tuple(Entry(INSERT) for _ in columns), trace(slot, None))
    base = lookup(baseline_slot)
    label_entry = Entry(label, ("stale",) if cell.stale else ())
    return Row((label_entry,) + tuple(c.compute(cell, base) for c in columns), trace(slot, cell))


def headers(first: str, columns: tuple[Column, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(headers, LaTeX alignments) of a table whose first column holds row labels."""
    return (first,) + tuple(c.header for c in columns), ("l",) + tuple(c.align for c in columns)


def baseline_row(lookup: Lookup, block: "Block", columns: tuple[Column, ...]) -> Row:
    """The block's baseline, against itself (speedup 1, ΔPPL 0)."""
    return result_row(lookup, block.baseline.display, block.baseline.slot, block.baseline.slot, columns)


def block_rows(lookup: Lookup, block: "Block", columns: tuple[Column, ...], *,
               with_baseline: bool = False) -> tuple[Row, ...]:
    """The block's rows against its baseline, the baseline's own row first when asked for."""
    rows = tuple(result_row(lookup, line.display, line.slot, block.baseline.slot, columns) for line in block.lines)
    return ((baseline_row(lookup, block, columns),) if with_baseline else ()) + rows
