"""LaTeX tables (and their plain-text twins) from result cells; never imports torch.

The stage code calls `write_all(lookup, spec, out_dir)` to rewrite NeurIPS/generated/*.tex, and
`render_text(lookup, spec)` to print the same tables in a terminal. `lookup` comes from the store, which
applies the reuse and stale rules (see cells.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..files import atomic_write
from . import ablations, engines, main, mit, negative, sweeps
from .cells import Cell, Lookup
from .meta import meta_tex
from .render import to_latex, to_text

__all__ = ["Block", "Cell", "Comparison", "Dataset", "EngineRow", "Line", "Lookup", "TablesSpec", "build_tables", "render_text", "write_all"]


@dataclass(frozen=True)
class Dataset:
    name: str          # as in slot names and result paths, e.g. "pg19"
    display: str       # as printed, e.g. "PG19"
    source: str = ""   # where the text comes from, e.g. "one PG19 test book"
    cite: str | None = None   # bibliography key of the dataset's paper; None: nothing to cite (demo streams)


@dataclass(frozen=True)
class Line:
    """One table row (one figure curve): its label and the slot whose result fills it, both from the plan."""

    display: str
    slot: str
    value: int | None = None       # a sweep row's knob value (the R-sweep figure's x)


@dataclass(frozen=True)
class Block:
    """Rows shown against one baseline: one dataset of the main table, the ablation ladder, one sweep."""

    title: str | None              # dataset display name (main table), or the swept knob as printed
    baseline: Line                 # the recompute baseline of the block's dataset
    lines: tuple[Line, ...]
    knob: str | None = None        # sweeps: "R", "sigma" or "delta", as in slot names


@dataclass(frozen=True)
class Comparison:
    """An appendix row: a reference implementation's point beside ours on the same stream and sizes."""

    dataset: str                   # display name
    reference: Line                # e.g. MIT's eval_long_ppl.py with our Start+Recent sizes
    ours: Line                     # our main point it is compared with
    provenance: dict               # the reference code: {"commit", "patch", ...} (streamkv.mit.provenance)


@dataclass(frozen=True)
class EngineRow:
    """A row of the engine comparison: one engine's TPOT without eviction and with each eviction policy."""

    dataset: str                   # display name
    engine: str                    # display name
    no_eviction: Line              # R = 0: the cache grows from C; the denominator of the overhead
    lines: tuple[Line, ...]        # strict, lazy: TPOT and overhead = TPOT / TPOT without eviction


@dataclass(frozen=True)
class TablesSpec:
    """What the tables need to know about the plan: which slots to ask for and how to label them.

    Built by streamkv.reports.tables_spec from the plan itself, so a slot name or a row label exists once."""

    profile: str                                   # "demo" | "paper" | ...; "demo" puts a notice on the title page
    model: str                                     # display name, e.g. "Pythia-2.8B"
    long: Dataset                                  # main, ablations and sweeps
    short: Dataset                                 # main only
    cap_total: int                                 # KV budget C
    n_sink: int                                    # S of the main runs
    lazy_r: int                                    # R of the main Lazy Pruning run
    # Stage name -> the rows its plan gives its tables (streamkv.experiments: Stage.rows); a stage that is
    # switched off has none. main: a Block per dataset, long first; ablations: a Block; sweeps: a Block per
    # swept knob; mit: Comparisons; bench: EngineRows.
    rows: Mapping[str, Any] = field(default_factory=dict)
    timing_indicative: bool = False                # CPU timings: the paper marks them indicative only
    random_weights: bool = False                   # timing-only weights: a notice on the title page

    def sweep(self, knob: str) -> Block | None:
        return next((b for b in self.rows.get("sweeps", ()) if b.knob == knob), None)


# (file stem, generator); a generator returns None when its table has no rows in this plan.
GENERATORS = (("tables", main.build), ("ablations", ablations.build), ("sweeps", sweeps.build),
              ("negative_results", negative.build), ("mit_reference", mit.build), ("engines", engines.build))


def build_tables(lookup: Lookup, spec: TablesSpec):
    return [table for _, generate in GENERATORS if (table := generate(lookup, spec)) is not None]


def write_all(lookup: Lookup, spec: TablesSpec, out_dir: Path | str) -> list[Path]:
    """Rewrite tables.tex, ablations.tex, sweeps.tex, negative_results.tex, mit_reference.tex (when MIT's
    reference is planned; an old copy is removed otherwise) and meta.tex in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, generate in GENERATORS:
        table = generate(lookup, spec)
        if table is None:
            (out / f"{name}.tex").unlink(missing_ok=True)   # an old table would pass for a current one
            continue
        written.append(out / f"{name}.tex")
        atomic_write(written[-1], to_latex(table).encode("utf-8"))
    written.append(out / "meta.tex")
    atomic_write(written[-1], meta_tex(spec).encode("utf-8"))
    return written


def render_text(lookup: Lookup, spec: TablesSpec) -> str:
    """Every table as plain text, for `streamkv tables` to print."""
    return "\n".join(to_text(table) for table in build_tables(lookup, spec))
