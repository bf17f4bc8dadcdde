"""The Lazy Pruning ablation ladder on the long dataset (table ablations.tex)."""
from __future__ import annotations

from .. import tables
from ..context import Context, Point
from ..plans import baseline_line, lines, variant_points


def plan(ctx: Context) -> list[Point]:
    ladder = ctx.profile.ablations(ctx.settings.run_quality_heuristics)
    return variant_points(ctx, "ablations", ctx.profile.long, ladder)


def rows(ctx: Context) -> tables.Block:
    return tables.Block(None, baseline_line(ctx, ctx.profile.long), lines(plan(ctx)))
