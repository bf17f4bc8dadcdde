"""Figures from measured results only: the KV-cache length per step, and PPL / TPOT against R.

A figure whose inputs are missing is not drawn, and an old copy is deleted, so the paper shows its
placeholder box instead (never a synthetic curve, as the seed's Fig. 1 was). Results reach this module
only through the store (its lookup, and streamkv.store.read_cache_len for the curves), so the stale rules of
the tables apply here too; the curves and their labels are the plan's (TablesSpec lines).
Output is vector PDF with fixed metadata: the same results give byte-identical files.
"""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from .store import Cell, read_cache_len
from .tables import Lookup, TablesSpec

log = logging.getLogger(__name__)

CACHE_LEN = "fig_cache_len.pdf"
R_SWEEP = "fig_r_sweep.pdf"
# No dates and no version strings: those are the only parts of a matplotlib PDF that vary between runs.
_METADATA = {"CreationDate": None, "Creator": "streamkv.figures", "Producer": "streamkv"}
_STYLE = {"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7, "pdf.fonttype": 42,
          "axes.spines.top": False, "axes.spines.right": False}


def cache_lengths(cell: Cell) -> list[int] | None:
    """The measured cache length after each step (the result's cache_len artifact), or None."""
    if "cache_len" not in cell.artifacts:
        log.warning("%s: the result has no cache_len artifact", cell.slot)
        return None
    try:
        return read_cache_len(cell.artifacts["cache_len"])
    except ValueError as err:
        log.warning("%s: no usable cache_len artifact (%s)", cell.slot, err)
        return None


def _name(text: str, *cells: Cell) -> str:
    """Legend label; a dagger when any result behind the curve is stale."""
    return text + (" †" if any(c.stale for c in cells) else "")


def _finish(fig: Figure, cells: list[Cell], *, timed: bool = False) -> None:
    """Footnotes for the marks the figure carries; the shared-GPU one only where it shows timings."""
    notes = []
    if any(c.stale for c in cells):
        notes.append("† stale result: its configuration no longer matches the plan (ALLOW_STALE_RESULTS=1)")
    if timed and any(c.timed_on_shared_device for c in cells):
        notes.append("‡ timed by one of several workers on the same GPU: the time may include the others' work")
    if notes:
        fig.supxlabel("\n".join(notes), fontsize=6, x=0.99, ha="right")


def _provenance(cells: list[Cell]) -> str:
    """Written into the PDF's Subject: which result files the figure was drawn from."""
    return "; ".join(f"slot={c.slot} config_hash={c.config_hash}" for c in cells)


def cache_len_figure(lookup: Lookup, spec: TablesSpec) -> tuple[Figure, list[Cell]] | None:
    """Strict vs lazy on the long dataset: whole stream on the left, its first few prune cycles on the right."""
    if not spec.rows.get("main"):
        return None
    lines = spec.rows["main"][0].lines
    cells = [lookup(line.slot) for line in lines]
    if None in cells:
        log.info("%s not drawn: one of %s is missing", CACHE_LEN, ", ".join(line.slot for line in lines))
        return None
    curves = [cache_lengths(c) for c in cells]
    if None in curves:
        return None
    labels = [line.display for line in lines]
    zoom = min(max(map(len, curves)), max(32, 4 * spec.lazy_r))   # enough steps to show a few lazy cycles
    fig = Figure(figsize=(5.5, 1.9), layout="constrained")
    for ax, limit, title in zip(fig.subplots(1, 2), (None, zoom),
                                ("whole stream", f"first {zoom} steps")):
        # Strict drawn above lazy: over a long stream the lazy sawtooth fills a band that would hide it.
        for cell, curve, label, zorder in zip(cells, curves, labels, (3, 2)):
            ys = curve[:limit]
            ax.plot(range(len(ys)), ys, drawstyle="steps-post", linewidth=0.8, zorder=zorder,
                    label=_name(label, cell))
        ax.set(xlabel="step (0 = prefill forward)", title=f"{spec.long.display}, {title}")
    fig.axes[0].set_ylabel("cached tokens after the step")
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=2)
    _finish(fig, cells)
    return fig, cells


def r_sweep_figure(lookup: Lookup, spec: TablesSpec) -> tuple[Figure, list[Cell]] | None:
    """PPL and TPOT against R; drawn only when every grid point was measured (no silently dropped R)."""
    block = spec.sweep("R")
    lines = block.lines if block else ()
    grid = [line.value for line in lines]
    cells = [lookup(line.slot) for line in lines]
    if len(grid) < 2 or None in cells:
        log.info("%s not drawn: the R sweep is incomplete or has fewer than 2 points", R_SWEEP)
        return None
    if any(c.metric("perplexity") is None or c.metric("tpot_ms") is None for c in cells):
        log.warning("%s not drawn: a sweep result lacks perplexity or tpot_ms", R_SWEEP)
        return None
    baseline = lookup(block.baseline.slot)
    used = cells + ([baseline] if baseline is not None else [])
    fig = Figure(figsize=(5.5, 1.7), layout="constrained")
    shared = " ‡" if any(c.timed_on_shared_device for c in used) else ""
    panels = (("perplexity", None, "PPL"), ("tpot_ms", "tpot_ms_spread", f"TPOT (ms, median){shared}"))
    for ax, (key, spread_key, ylabel) in zip(fig.subplots(1, 2), panels):
        ys = [c.metric(key) for c in cells]
        errs = [c.metric(spread_key) or 0.0 for c in cells] if spread_key else None
        ax.errorbar(grid, ys, yerr=errs, marker="o", markersize=3, linewidth=0.8, capsize=2,
                    label=_name("Lazy Pruning", *cells))
        if baseline is not None and baseline.metric(key) is not None:
            ax.axhline(baseline.metric(key), linestyle="--", linewidth=0.8, color="gray",
                       label=_name(block.baseline.display, baseline))
        if min(grid) > 0:          # R = 0 (never prune) has no place on a log axis
            ax.set_xscale("log", base=2)
        ax.set_xticks(grid, [str(r) for r in grid])
        ax.set(xlabel="R", ylabel=ylabel, title=spec.long.display)
    fig.axes[0].legend()
    _finish(fig, used, timed=True)
    return fig, used


FIGURES = ((CACHE_LEN, cache_len_figure), (R_SWEEP, r_sweep_figure))


def write_all(lookup: Lookup, spec: TablesSpec, out_dir: Path | str) -> list[Path]:
    """Draw every figure whose inputs exist into `out_dir`; delete those that cannot be drawn."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in FIGURES:
        target = out / name
        with matplotlib.rc_context(_STYLE):
            drawn = draw(lookup, spec)
            if drawn is None:
                target.unlink(missing_ok=True)   # an old figure would pass for a current one
                continue
            fig, cells = drawn
            fig.savefig(target, format="pdf", metadata={**_METADATA, "Subject": _provenance(cells)})
        written.append(target)
    return written
