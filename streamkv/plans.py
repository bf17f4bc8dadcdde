"""Plans: each stage's Points (slot, spec), from the profile and the knobs.

A plan is the list of Points a stage fills: streamkv/stages.py computes what the store lacks, and
streamkv/reports.py takes the tables' rows and curves from the same plans. Slots (docs/ARCHITECTURE.md):
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

from . import engines
from .context import Context, Point, StageError, classify, variant_slot
from .profiles import Dataset, Variant
from .settings import Settings
from .runspec import RunSpec
from .spec import MeasureSpec
from .store import Store

BASELINE_DISPLAY = "Baseline (sliding-window recompute)"


def warmup_runs(ctx: Context) -> int:
    """WARMUP_RUNS, but at least one on CUDA: the first run pays compilation, graph capture and kernel plans."""
    s = ctx.settings
    return max(s.warmup_runs, 1) if ctx.profile.device.startswith("cuda") else s.warmup_runs


def with_engines(ctx: Context, draft: RunSpec, engine: str | None = None) -> RunSpec:
    """`draft` with its perplexity engine (`engine`, else the profile's where it can realise the point, else
    decode, which realises every streaming point) and its timing protocol (streamkv/timing.py): the fastest
    exact engine that can time it, which is the run itself when that is its perplexity engine."""
    if draft.mode == "baseline":
        engine = "recompute"
    elif engine is None:
        preferred = ctx.profile.perplexity_engine
        engine = preferred if engines.get(preferred).supports(draft) is None else "decode"
    timing = engines.timing_engine(draft)   # what can time a point depends on the point, not its engine
    own = timing == engine
    return dataclasses.replace(draft, engine=engine, measure=MeasureSpec(
        warmup_runs=warmup_runs(ctx), repeat_runs=ctx.settings.repeat_runs,
        timing_tokens=0 if own else ctx.profile.timing_tokens, timing_engine="" if own else timing))


def streaming_spec(ctx: Context, dataset: Dataset, variant: Variant) -> RunSpec | None:
    policy = ctx.profile.policy(variant)   # a bad knob fails here, with or without the DataSpec
    data = ctx.data(dataset)
    if data is None:
        return None
    draft = RunSpec(model=ctx.model, data=data, mode="streaming", policy=policy, position_mode=variant.position_mode,
                    rerotation=variant.rerotation, engine="decode", device=ctx.profile.device)
    return with_engines(ctx, draft)


def _stored_spec(store: Store, slot: str) -> RunSpec | None:
    try:
        return RunSpec.from_dict(store.read(store.path(slot))["spec"])
    except (ValueError, KeyError, TypeError):
        return None


def plan_baseline(ctx: Context, runs: int | None = None, datasets: tuple[Dataset, ...] | None = None) -> list[Point]:
    """The recompute baseline per dataset. Without `runs`, a stored baseline that differs only in its
    repeat count is the one wanted: the baseline is fixed and reused, not re-timed per REPEAT_RUNS."""
    points = []
    for d in datasets or ctx.profile.datasets:
        slot = f"baselines/{d.name}"
        data = ctx.data(d)
        spec = None if data is None else RunSpec(
            model=ctx.model, data=data, mode="baseline", policy=ctx.profile.baseline_policy(), engine="recompute",
            device=ctx.profile.device,
            # No warm-up run: one baseline run recomputes a full window per token for the whole stream
            # (PG19: minutes), and its TPOT is a mean over thousands of steps, the first few included.
            measure=MeasureSpec(0, runs or 1), recompute_batch=ctx.settings.recompute_batch)
        stored = _stored_spec(ctx.store, slot)
        if spec is not None and runs is None and stored is not None \
                and dataclasses.replace(stored, measure=spec.measure) == spec:
            spec = stored
        points.append(Point(slot, spec, BASELINE_DISPLAY))
    return points


def _variant_points(ctx: Context, stage: str, dataset: Dataset, variants) -> list[Point]:
    return [Point(variant_slot(stage, dataset, v.label), streaming_spec(ctx, dataset, v), v.display, v.value)
            for v in variants]


def plan_main(ctx: Context, datasets: tuple[Dataset, ...] | None = None) -> list[Point]:
    return [p for d in datasets or ctx.profile.datasets
            for p in _variant_points(ctx, "main", d, ctx.profile.main_variants())]


def plan_ablations(ctx: Context) -> list[Point]:
    ladder = ctx.profile.ablations(ctx.settings.run_quality_heuristics)
    return _variant_points(ctx, "ablations", ctx.profile.long, ladder)


def sweep_points(ctx: Context) -> dict[str, list[Point]]:
    return {knob: _variant_points(ctx, "sweeps", ctx.profile.long, variants)
            for knob, variants in ctx.profile.sweeps(ctx.settings.run_quality_heuristics).items()}


def plan_sweeps(ctx: Context) -> list[Point]:
    return [p for points in sweep_points(ctx).values() for p in points]


# The engine comparison of the bench: the seed's style of decoding (HF forward, DynamicCache, eviction by
# re-slicing the cache) beside the ring-buffer engine, each timing itself on the same tokens.
BENCH_ENGINES = (("decode", "streaming", "HF decode"), ("fast", "fast", "fast (ring buffer)"))


def plan_bench(ctx: Context) -> list[Point]:
    """Decode speed and memory of each method on the first C + N + 1 tokens of each stream (N =
    MIT_BENCH_GEN_TOKENS): one prefill forward of C tokens, then N tokens decoded one per forward, fed from
    the stream (teacher forcing: a forward costs the same whichever token it is fed, and every method
    decodes the very same tokens). The seed guide filled this role with MIT's benchmark_streaming.py;
    here the paper's own engines do it: the decode engine for Start+Recent and Lazy Pruning (it times
    itself), the recompute engine for the baseline. Each is an ordinary point with its own spec.
    On the long stream, the engine comparison (`bench_engine_points`) adds no eviction and the fast engine."""
    p, points = ctx.profile, []
    for d in p.datasets:
        data = _bench_data(ctx, d)
        points += _bench_points(ctx, d, data, "decode", p.main_variants())
        spec = None if data is None else RunSpec(mode="baseline", policy=p.baseline_policy(), engine="recompute",
                                                 model=ctx.model, data=data, device=p.device, measure=_bench_timing(ctx),
                                                 recompute_batch=ctx.settings.recompute_batch)
        points.append(Point(f"mit_bench/{d.name}_benchmark_recompute", spec, BASELINE_DISPLAY))
    return points + [pt for row in bench_engine_points(ctx) for pt in row[1]]


def bench_engine_points(ctx: Context) -> list[tuple[str, list[Point]]]:
    """(engine display, its points: no eviction, then the main variants) per engine of BENCH_ENGINES."""
    d = ctx.profile.long
    data = _bench_data(ctx, d)
    return [(display, _bench_points(ctx, d, data, engine, ctx.profile.engine_variants()))
            for engine, _, display in BENCH_ENGINES]


def _bench_data(ctx: Context, d: Dataset):
    return ctx.data(dataclasses.replace(d, max_tokens=ctx.profile.cap_total + ctx.settings.mit_bench_gen_tokens + 1))


def _bench_timing(ctx: Context) -> MeasureSpec:
    return MeasureSpec(warmup_runs=warmup_runs(ctx), repeat_runs=ctx.settings.repeat_runs)


def _bench_points(ctx: Context, d: Dataset, data, engine: str, variants) -> list[Point]:
    stem = next(stem for name, stem, _ in BENCH_ENGINES if name == engine)
    p = ctx.profile
    return [Point(f"mit_bench/{d.name}_benchmark_{stem}_{v.label}", None if data is None else RunSpec(
                mode="streaming", policy=p.policy(v), position_mode=v.position_mode, rerotation=v.rerotation,
                engine=engine, model=ctx.model, data=data, device=p.device, measure=_bench_timing(ctx)), v.display)
            for v in variants]


def plan_mit(ctx: Context) -> list[Point]:
    return [Point(m.slot, m.spec, m.reference.display) for m in ctx.mit()]


PLANNERS = {"main": plan_main, "ablations": plan_ablations, "sweeps": plan_sweeps, "bench": plan_bench,
            "mit": plan_mit}
COMPARED_WITH_BASELINE = ("main", "ablations", "sweeps")


def paper_stages(settings: Settings) -> tuple[str, ...]:
    """What `paper` runs and the tables show: RUN_ABLATIONS / RUN_SWEEPS switch those stages off,
    RUN_MIT_REFERENCE / RUN_MIT_BENCH switch the optional ones on."""
    s = settings
    return (("baseline", "main") + ("ablations",) * s.run_ablations + ("sweeps",) * s.run_sweeps
            + ("mit",) * s.run_mit_reference + ("bench",) * s.run_mit_bench)


def plan(ctx: Context, names, *, runs: int | None = None) -> list[Point]:
    """Points of the named stages, the baselines they compare against first, each slot once."""
    needs_baseline = "baseline" not in names and any(n in COMPARED_WITH_BASELINE for n in names)
    points = _required_baselines(ctx, names) if needs_baseline else []
    for name in names:
        points += plan_baseline(ctx, runs) if name == "baseline" else PLANNERS[name](ctx)
    unique = {}
    for p in points:
        unique.setdefault(p.slot, p)
    return list(unique.values())


def _required_baselines(ctx: Context, names) -> list[Point]:
    datasets = ctx.profile.datasets if "main" in names else (ctx.profile.long,)
    points = plan_baseline(ctx, datasets=datasets)
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
