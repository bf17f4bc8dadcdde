"""Reports: the tables and figures (`write_tables`) and the status listing (`status`), from results only.

Both plan without tokenizing (streamkv/context.py: the stream index) and never load a model; the rows and
curves come from the plan itself (`tables_spec`), so a slot name or a row label exists once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import experiments, figures, tables
from .console import say
from .context import Context, classify, context
from .plans import paper_stages, plan
from .profiles import Profile
from .settings import Settings, default_results_dir
from .store import Store


def tables_spec(ctx: Context) -> tables.TablesSpec:
    """The slots and labels of every table row and figure curve, taken from the plan itself: the rows of
    each enabled stage that feeds a table (streamkv/experiments)."""
    profile = ctx.profile
    return tables.TablesSpec(
        profile=profile.name, model=profile.model_display,
        long=tables.Dataset(profile.long.name, profile.long.display, profile.long.source, profile.long.cite),
        short=tables.Dataset(profile.short.name, profile.short.display, profile.short.source, profile.short.cite),
        cap_total=profile.cap_total, n_sink=profile.n_sink, lazy_r=profile.lazy_r,
        rows={s.name: s.rows(ctx) for s in experiments.enabled(ctx.settings) if s.tables},
        timing_indicative=not profile.device.startswith("cuda"),
        random_weights=ctx.random_weights,
    )


@dataclass
class TablesReport:
    text: str
    written: list[Path]
    stale: list[str]          # slots whose stale result filled a cell (ALLOW_STALE_RESULTS=1) or was refused
    problems: list[str]       # unreadable result files, skipped
    why_stale: dict[str, str] = field(default_factory=dict)   # slot -> what differs from the plan, in words


def _flat(doc, prefix: str = "") -> dict:
    """{"a.b": value} for every leaf of nested dicts."""
    if not isinstance(doc, dict):
        return {prefix: doc}
    return {k: v for key, value in doc.items() for k, v in _flat(value, f"{prefix}.{key}" if prefix else key).items()}


def _hashed_view(spec, stored: dict) -> tuple[dict, dict]:
    """(planned, stored) as the hash sees them: the hashed fields where the spec type can read its stored
    form back, else the whole stored form."""
    try:
        return spec.hashed(), type(spec).from_dict(stored["spec"]).hashed()
    except (AttributeError, KeyError, TypeError, ValueError):   # a MIT spec, or a form it no longer reads
        return spec.to_dict(), stored.get("spec", {})


def why_stale(spec, stored: dict, shown: int = 3) -> str:
    """What makes a stored result stale against the planned spec, in words: the differing hashed fields,
    then the code whose identity moved (a table built with other knobs than the run's says which)."""
    if spec is None:
        return ("nothing to compare with: its stream is not in the stream index with these knobs (were the "
                "results made with another CAP_TOTAL, sample length or MIT_BENCH_GEN_TOKENS?)")
    planned_spec, held_spec = _hashed_view(spec, stored)
    planned = {**_flat(planned_spec), **_flat(getattr(spec, "code_identity", dict)(), "code")}
    held = {**_flat(held_spec), **_flat(stored.get("code", {}), "code")}
    keys = sorted((k for k in planned.keys() | held.keys() if planned.get(k) != held.get(k)),
                  key=lambda k: (k.startswith("code."), k))
    if not keys:
        return "same fields, other hash (written by another version of the hashing)"
    def value(view: dict, k: str) -> str:
        return repr(view[k]) if k in view else "absent"

    words = [f"the code of {k.removeprefix('code.')} changed" if k.startswith("code.") else
             f"{k}: stored {value(held, k)}, planned {value(planned, k)}" for k in keys[:shown]]
    return "; ".join(words) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")


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
    points = {p.slot: p for p in plan(ctx, paper_stages(settings))}
    expected = {slot: p.spec and p.spec.config_hash() for slot, p in points.items()}

    def lookup(slot: str):
        return ctx.store.lookup(slot, expected.get(slot), settings.allow_stale_results)

    spec = tables_spec(ctx)
    written = tables.write_all(lookup, spec, out_dir) + figures.write_all(lookup, spec, out_dir)
    text = tables.render_text(lookup, spec)
    why = {}
    for slot, cell in ctx.store.stale.items():
        try:
            why[slot] = why_stale(points[slot].spec if slot in points else None, ctx.store.read(cell.path))
        except ValueError as e:   # unreadable since the lookup: say that instead
            why[slot] = str(e)
    return TablesReport(text, written, sorted(ctx.store.stale), sorted(ctx.store.problems.values()), why)


def status(settings: Settings, *, profile: Profile | None = None) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(slot, state, engine)] for every planned point, problems found in the results directory)."""
    ctx = _reading_context(settings, profile)
    names = paper_stages(settings)
    rows = [(p.slot, classify(ctx, p), p.spec.engine if p.spec else "?") for p in plan(ctx, names)]
    return rows, ctx.store.scan().problems
