"""Sweeps of one knob around the main lazy point on the long dataset: R always, σ and δ with
RUN_QUALITY_HEURISTICS=1 (table sweeps.tex, the R-sweep figure)."""
from __future__ import annotations

from .. import tables
from ..context import Context, Point
from ..plans import baseline_line, lines, variant_points
from ..profiles import SWEEP_SYMBOLS


def _points(ctx: Context) -> dict[str, list[Point]]:
    return {knob: variant_points(ctx, "sweeps", ctx.profile.long, variants)
            for knob, variants in ctx.profile.sweeps(ctx.settings.run_quality_heuristics).items()}


def plan(ctx: Context) -> list[Point]:
    return [p for points in _points(ctx).values() for p in points]


def rows(ctx: Context) -> tuple[tables.Block, ...]:
    """One block per swept knob."""
    baseline = baseline_line(ctx, ctx.profile.long)
    return tuple(tables.Block(SWEEP_SYMBOLS[knob], baseline, lines(points), knob)
                 for knob, points in _points(ctx).items())
