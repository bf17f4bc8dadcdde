"""Main results: Start+Recent and Lazy Pruning on both datasets (table tables.tex, the cache-length figure)."""
from __future__ import annotations

from .. import tables
from ..context import Context, Point
from ..plans import baseline_line, lines, variant_points
from ..profiles import Dataset


def plan(ctx: Context, datasets: tuple[Dataset, ...] | None = None) -> list[Point]:
    return [p for d in datasets or ctx.profile.datasets
            for p in variant_points(ctx, "main", d, ctx.profile.main_variants())]


def rows(ctx: Context) -> tuple[tables.Block, ...]:
    """One block per dataset, long first: its baseline, then strict and lazy."""
    return tuple(tables.Block(d.display, baseline_line(ctx, d), lines(plan(ctx, (d,)))) for d in ctx.profile.datasets)
