"""Decode speed and memory of each method on the first C + N + 1 tokens of each stream (table engines.tex).

N = MIT_BENCH_GEN_TOKENS: one prefill forward of C tokens, then N tokens decoded one per forward, fed from
the stream (teacher forcing: a forward costs the same whichever token it is fed, and every method decodes
the very same tokens). The seed guide filled this role with MIT's benchmark_streaming.py; here the paper's
own engines do it: the decode engine for Start+Recent and Lazy Pruning (it times itself), the recompute
engine for the baseline. Each is an ordinary point with its own spec. On the long stream, the engine
comparison (`engine_points`) adds no eviction and the fast engine.
"""
from __future__ import annotations

import dataclasses

import click

from .. import tables
from ..context import Context, Point
from ..plans import BASELINE_DISPLAY, lines, warmup_runs
from ..profiles import Dataset
from ..runspec import RunSpec
from ..spec import MeasureSpec

OPTIONS = (
    click.option("--gen-tokens", "mit_bench_gen_tokens", type=int, default=None,
                 help="Tokens decoded after the C-token prefill  [env MIT_BENCH_GEN_TOKENS, default 512]"),
    click.option("--random-weights", is_flag=True,
                 help="Weights drawn from a fixed seed (timing needs no real ones; recorded in each spec)."),
)

# The engine comparison of the bench: the seed's style of decoding (HF forward, DynamicCache, eviction by
# re-slicing the cache) beside the ring-buffer engine, each timing itself on the same tokens.
ENGINES = (("decode", "streaming", "HF decode"), ("fast", "fast", "fast (ring buffer)"))


def plan(ctx: Context) -> list[Point]:
    p, points = ctx.profile, []
    for d in p.datasets:
        data = _data(ctx, d)
        points += _points(ctx, d, data, "decode", p.main_variants())
        spec = None if data is None else RunSpec(mode="baseline", policy=p.baseline_policy(), engine="recompute",
                                                 model=ctx.model, data=data, device=p.device, measure=_timing(ctx),
                                                 recompute_batch=ctx.settings.recompute_batch)
        points.append(Point(f"mit_bench/{d.name}_benchmark_recompute", spec, BASELINE_DISPLAY))
    return points + [pt for row in engine_points(ctx) for pt in row[1]]


def engine_points(ctx: Context) -> list[tuple[str, list[Point]]]:
    """(engine display, its points: no eviction, then the main variants) per engine of ENGINES."""
    d = ctx.profile.long
    data = _data(ctx, d)
    return [(display, _points(ctx, d, data, engine, ctx.profile.engine_variants())) for engine, _, display in ENGINES]


def rows(ctx: Context) -> tuple[tables.EngineRow, ...]:
    """One row per engine: its point without eviction, then with each eviction policy."""
    return tuple(tables.EngineRow(ctx.profile.long.display, display, lines(points[:1])[0], lines(points[1:]))
                 for display, points in engine_points(ctx))


def _data(ctx: Context, d: Dataset):
    return ctx.data(dataclasses.replace(d, max_tokens=ctx.profile.cap_total + ctx.settings.mit_bench_gen_tokens + 1))


def _timing(ctx: Context) -> MeasureSpec:
    return MeasureSpec(warmup_runs=warmup_runs(ctx), repeat_runs=ctx.settings.repeat_runs)


def _points(ctx: Context, d: Dataset, data, engine: str, variants) -> list[Point]:
    stem = next(stem for name, stem, _ in ENGINES if name == engine)
    p = ctx.profile
    return [Point(f"mit_bench/{d.name}_benchmark_{stem}_{v.label}", None if data is None else RunSpec(
                mode="streaming", policy=p.policy(v), position_mode=v.position_mode, rerotation=v.rerotation,
                engine=engine, model=ctx.model, data=data, device=p.device, measure=_timing(ctx)), v.display)
            for v in variants]
