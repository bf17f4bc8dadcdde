"""Reports: the tables and figures (`write_tables`) and the status listing (`status`), from results only.

Both plan without tokenizing (streamkv/context.py: the stream index) and never load a model; the rows and
curves come from the plan itself (`tables_spec`), so a slot name or a row label exists once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import figures, tables
from .console import say
from .context import Context, Point, classify, context, variant_slot
from .plans import bench_engine_points, paper_stages, plan, plan_ablations, plan_baseline, plan_main, sweep_points
from .profiles import SWEEP_SYMBOLS, Profile
from .settings import Settings, default_results_dir
from .store import Store


def tables_spec(ctx: Context) -> tables.TablesSpec:
    """The slots and labels of every table row and figure curve, taken from the plan itself."""
    profile, names = ctx.profile, paper_stages(ctx.settings)

    def lines(points: list[Point]) -> tuple[tables.Line, ...]:
        return tuple(tables.Line(p.display, p.slot, p.value) for p in points)

    baseline = {d.name: lines(plan_baseline(ctx, datasets=(d,)))[0] for d in profile.datasets}
    long = profile.long.name
    return tables.TablesSpec(
        profile=profile.name, model=profile.model_display,
        long=tables.Dataset(long, profile.long.display, profile.long.source, profile.long.cite),
        short=tables.Dataset(profile.short.name, profile.short.display, profile.short.source, profile.short.cite),
        cap_total=profile.cap_total, n_sink=profile.n_sink, lazy_r=profile.lazy_r,
        main=tuple(tables.Block(d.display, baseline[d.name], lines(plan_main(ctx, (d,)))) for d in profile.datasets),
        ablations=tables.Block(None, baseline[long], lines(plan_ablations(ctx))) if "ablations" in names else None,
        sweeps=tuple(tables.Block(SWEEP_SYMBOLS[knob], baseline[long], lines(points), knob)
                     for knob, points in sweep_points(ctx).items()) if "sweeps" in names else (),
        timing_indicative=not profile.device.startswith("cuda"),
        random_weights=ctx.random_weights,
        mit=_mit_comparisons(ctx) if "mit" in names else (),
        engines=tuple(tables.EngineRow(profile.long.display, display, lines(points[:1])[0], lines(points[1:]))
                      for display, points in bench_engine_points(ctx)) if "bench" in names else (),
    )


def _mit_comparisons(ctx: Context) -> tuple[tables.Comparison, ...]:
    """Each MIT reference beside the main point of ours with the same sinks and recent window."""
    ours = {p.slot: tables.Line(p.display, p.slot) for p in plan_main(ctx)}
    return tuple(tables.Comparison(m.dataset.display, tables.Line(m.reference.display, m.slot),
                                   ours[variant_slot("main", m.dataset, m.reference.ours)], m.spec.provenance)
                 for m in ctx.mit())


@dataclass
class TablesReport:
    text: str
    written: list[Path]
    stale: list[str]          # slots whose stale result filled a cell (ALLOW_STALE_RESULTS=1) or was refused
    problems: list[str]       # unreadable result files, skipped


def _reading_context(settings: Settings, profile: Profile | None) -> Context:
    """The context of `tables` and `status`, which only read results: a results directory named explicitly
    must exist (a typo would otherwise read as "nothing computed yet"); the default may be absent."""
    present = Store(settings.results_dir).check_readable(must_exist=Path(settings.results_dir) != default_results_dir())
    ctx = context(settings, tokenize=False, profile=profile)
    if not present:
        say(f"note: results directory {ctx.store.root} does not exist yet: no point has been computed")
    return ctx


def write_tables(settings: Settings, out_dir: Path, *, profile: Profile | None = None) -> TablesReport:
    """Rewrite NeurIPS/generated/*.tex and the figures from the results; never loads a model."""
    ctx = _reading_context(settings, profile)
    expected = {p.slot: p.spec and p.spec.config_hash() for p in plan(ctx, paper_stages(settings))}

    def lookup(slot: str):
        return ctx.store.lookup(slot, expected.get(slot), settings.allow_stale_results)

    spec = tables_spec(ctx)
    written = tables.write_all(lookup, spec, out_dir) + figures.write_all(lookup, spec, out_dir)
    text = tables.render_text(lookup, spec)
    return TablesReport(text, written, sorted(ctx.store.stale), sorted(ctx.store.problems.values()))


def status(settings: Settings, *, profile: Profile | None = None) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(slot, state, engine)] for every planned point, problems found in the results directory)."""
    ctx = _reading_context(settings, profile)
    names = paper_stages(settings)
    rows = [(p.slot, classify(ctx, p), p.spec.engine if p.spec else "?") for p in plan(ctx, names)]
    return rows, ctx.store.scan().problems
