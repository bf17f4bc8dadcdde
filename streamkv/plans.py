"""Plans: the Points (slot, spec) of the named stages, from the profile and the knobs.

Each stage plans its own points (streamkv/experiments/, one module per stage, one registry); this module
holds what several share (the engines and timing protocol of a streaming point, its variant slots, the row
lines of a table) and `plan`, which puts the baselines a stage is compared against in front of it. A plan
is what streamkv/stages.py computes and what streamkv/reports.py takes the tables' rows and curves from.
Slots (docs/ARCHITECTURE.md):
  baselines/{dataset}                      the fixed sliding-window-recompute baseline, both datasets
  main/{dataset}/{strict,lazy}             both datasets
  ablations/{long}/{label}                 the profile's ladder on the long dataset
  sweeps/{long}/{R,sigma,delta}={v}        R always; σ and δ with RUN_QUALITY_HEURISTICS=1
  mit_bench/{dataset}_benchmark_{streaming_strict,streaming_lazy,recompute}
                                           bench: decode speed and memory on the first C + N + 1 tokens
  mit_bench/{dataset}_mit_reference[_windowmatch]
                                           MIT's eval_long_ppl.py (a mit.MitSpec), run by mit_runner.MitRunner

The baseline is reused across runs whatever REPEAT_RUNS says (only `baseline --runs N` asks for another
count). The other stages need it: a missing one is generated when AUTO_BASELINE=1.
"""
from __future__ import annotations

import dataclasses

from . import engines, experiments, tables
from .context import Context, Point, StageError, classify, variant_slot
from .profiles import Dataset
from .settings import Settings
from .runspec import RunSpec
from .spec import MeasureSpec

BASELINE_DISPLAY = "Baseline (sliding-window recompute)"
# The perplexity engine of a point the profile's cannot realise: it realises every streaming point, in one
# forward per prune period. Decoding it instead, and so timing all of PG19 token by token four times over,
# cost each such point 24 to 34 minutes of an H100 (17.8 to 25.7 ms a token); `periods` takes under 10 s.
# Such a point is timed like any other, on the profile's timing prefix (by decode: fast refuses it).
FALLBACK = "periods"


def warmup_runs(ctx: Context) -> int:
    """WARMUP_RUNS, but at least one on CUDA: the first run pays compilation, graph capture and kernel plans."""
    s = ctx.settings
    return max(s.warmup_runs, 1) if ctx.profile.device.startswith("cuda") else s.warmup_runs


def with_engines(ctx: Context, draft: RunSpec, engine: str | None = None) -> RunSpec:
    """`draft` with its perplexity engine (`engine`, else the profile's where it can realise the point, else
    FALLBACK) and its timing protocol (streamkv/timing.py): the fastest exact engine that can time it, which
    is the run itself when that is its perplexity engine."""
    if draft.mode == "baseline":
        engine = "recompute"
    elif engine is None:
        preferred = ctx.profile.perplexity_engine
        engine = preferred if engines.get(preferred).supports(draft) is None else FALLBACK
    timing = engines.timing_engine(draft)   # what can time a point depends on the point, not its engine
    own = timing == engine
    return dataclasses.replace(draft, engine=engine, measure=MeasureSpec(
        warmup_runs=warmup_runs(ctx), repeat_runs=ctx.settings.repeat_runs,
        timing_tokens=0 if own else ctx.profile.timing_tokens, timing_engine="" if own else timing))


def streaming_spec(ctx: Context, dataset: Dataset, variant) -> RunSpec | None:
    policy = ctx.profile.policy(variant)   # a bad knob fails here, with or without the DataSpec
    data = ctx.data(dataset)
    if data is None:
        return None
    draft = RunSpec(model=ctx.model, data=data, mode="streaming", policy=policy, position_mode=variant.position_mode,
                    rerotation=variant.rerotation, engine="decode", device=ctx.profile.device)
    return with_engines(ctx, draft)


def variant_points(ctx: Context, stage: str, dataset: Dataset, variants) -> list[Point]:
    """One streaming point per profile Variant, in slots stage/dataset/label."""
    return [Point(variant_slot(stage, dataset, v.label), streaming_spec(ctx, dataset, v), v.display, v.value)
            for v in variants]


def lines(points: list[Point]) -> tuple[tables.Line, ...]:
    """Table rows (figure curves) of points: their labels and slots, from the plan itself."""
    return tuple(tables.Line(p.display, p.slot, p.value) for p in points)


def baseline_line(ctx: Context, dataset: Dataset) -> tables.Line:
    """The row of the dataset's recompute baseline, which every compared block shows first."""
    return lines(experiments.get(experiments.BASELINE).plan(ctx, datasets=(dataset,)))[0]


def paper_stages(settings: Settings) -> tuple[str, ...]:
    """What `paper` runs and the tables show: the registry's stages whose switch (RUN_ABLATIONS, ...) is on."""
    return tuple(s.name for s in experiments.enabled(settings))


def plan(ctx: Context, names, **options) -> list[Point]:
    """Points of the named stages, the baselines they compare against first, each slot once. `options` go
    to each named stage's plan (a single stage's command options, e.g. the baseline's --runs)."""
    stages = [experiments.get(n) for n in names]
    compared = {s.compared_with for s in stages} - {None}
    points = _required_baselines(ctx, compared) if compared and experiments.BASELINE not in names else []
    for stage in stages:
        points += [dataclasses.replace(p, stage=stage.name) for p in stage.plan(ctx, **options)]
    unique = {}
    for p in points:
        unique.setdefault(p.slot, p)
    return list(unique.values())


def _required_baselines(ctx: Context, compared: set[str]) -> list[Point]:
    datasets = ctx.profile.datasets if "all" in compared else (ctx.profile.long,)
    points = [dataclasses.replace(p, stage=experiments.BASELINE)
              for p in experiments.get(experiments.BASELINE).plan(ctx, datasets=datasets)]
    s = ctx.settings
    if s.auto_baseline or s.force:
        return points
    # A stale baseline would be recomputed just like a missing one: AUTO_BASELINE=0 forbids both.
    unusable = {"missing"} if s.allow_stale_results else {"missing", "stale"}
    lacking = [str(ctx.store.path(p.slot)) for p in points if classify(ctx, p) in unusable]
    if lacking:
        raise StageError(f"no usable baseline ({', '.join(lacking)}) and AUTO_BASELINE=0: run "
                         "`streamkv baseline` first, or set AUTO_BASELINE=1")
    return points
