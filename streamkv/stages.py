"""Stages: compute what a plan is missing, through the store, and say what happened to each point.

A plan is a list of Points (slot, spec; streamkv/plans.py): `execute` classifies every kind of point and
hands what needs work to one executor (streamkv/executors.py), whose workers (streamkv/worker.py) settle
it. Execution, per point: reuse a result with the planned config_hash; copy one that another slot holds with
the same hash (the R=64 sweep point is the main lazy point); otherwise compute it. A stale result (same slot, other hash) is recomputed, or kept under ALLOW_STALE_RESULTS=1;
either way it is listed. Results are written one by one, atomically, so after a kill -9 a re-run computes
only the points not yet written.

A reused baseline's fingerprint is compared with this machine's: a warning, or a re-run under
STRICT_BASELINE_CHECK=1.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from . import executors, experiments, fingerprint, worker
from .console import say
from .context import Context, Point, classify, context
from .plans import plan
from .profiles import Profile
from .settings import Settings
from .store import Store


def _baseline_moved(ctx: Context, point: Point, here: dict) -> list[str]:
    stored = ctx.store.read(ctx.store.path(point.slot)).get("fingerprint") or {}
    return fingerprint.compare(stored, {**here, "dtype": point.spec.model.dtype})


@dataclass
class Outcome:
    computed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)      # runs that ended without a result (MIT's script)
    copied: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    stale_kept: list[str] = field(default_factory=list)
    stale_replaced: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)   # written by a concurrent run while this one waited


def execute(ctx: Context, points: list[Point], *, runner=None, label: str = "points") -> Outcome:
    """Compute the points that need it; returns what happened to each slot.

    This classifies every point; the executor (streamkv/executors.py) settles the rest through
    streamkv/worker.py, under each config hash's claim (Store.claim), so concurrent runs on one results
    directory split the work: a point another run writes meanwhile is counted as theirs. `runner` (tests)
    computes the RunSpecs in this process."""
    s, store, out = ctx.settings, ctx.store, Outcome()
    for leftover in store.sweep():
        say(f"removed what a killed write left: {leftover}")
    for problem in store.scan().problems:
        say(f"skipped: {problem}")
    machine = None   # this machine's fingerprint, collected for the first reused baseline
    todo = []   # (unit, whether its stage computes it in this process: Stage.here)
    for p in points:
        # The slot's file as this run found it, taken before it is classified: whatever another run writes
        # from here on counts as computed elsewhere (worker.written), never as a copy of itself. A slot
        # whose directory or file is a link or a special file stops the stage here, before anything is
        # computed (Store.identity).
        planned = store.identity(p.slot, p.spec.config_hash())
        state = "missing" if s.force else classify(ctx, p)
        stage = experiments.get(p.stage)
        # FORCE: no result of an earlier run is copied, only this run's; a re-measurement copies nothing.
        unit = worker.Unit(p.slot, p.spec, stage.runner, may_copy=not s.force, planned=planned)
        if state == "current" and p.slot.startswith(f"{experiments.get(experiments.BASELINE).slots}/"):
            machine = machine or fingerprint.collect()
            moved = _baseline_moved(ctx, p, machine)
            if moved:
                action = "re-running it (STRICT_BASELINE_CHECK=1)" if s.strict_baseline_check else \
                    "reusing it; STRICT_BASELINE_CHECK=1 re-runs it"
                say(f"warning: {p.slot} was measured in another environment ({'; '.join(moved)}); {action}")
                if s.strict_baseline_check:
                    todo.append((dataclasses.replace(unit, may_copy=False), stage.here))
                    continue
        if state == "current":
            out.reused.append(p.slot)
        elif state == "stale" and s.allow_stale_results:
            out.stale_kept.append(p.slot)
        else:
            if state == "stale":
                out.stale_replaced.append(p.slot)
            todo.append((unit, stage.here))
    report = {}
    with tqdm(total=len(points), initial=len(points) - len(todo), desc=label, unit="point", file=sys.stderr,
              dynamic_ncols=True) as bar:
        # The points go where the settings say, but those of stages that run here (MIT's reference: its
        # checkout and interpreter are on this machine) stay in this process; the executor is chosen (Slurm
        # reached, GPUs counted) only when something must be computed.
        for in_process in (False, True):
            mine = [u for u, stays in todo if stays == in_process]
            if mine:
                chosen = executors.InProcess(s, runner) if in_process else executors.executor(s, runner=runner)
                report.update(chosen.run(store, worker.units_of(mine, chosen.split(len(mine))), bar))
    for unit, _ in todo:
        # No report: its worker was lost after writing it (its result is there, or the executor failed).
        what = report.get(unit.slot, worker.COMPUTED)
        {worker.COMPUTED: out.computed, worker.COPIED: out.copied, worker.FAILED: out.failed,
         worker.DONE: out.elsewhere}[what].append(unit.slot)
    _report(out, len(points), label)
    return out


def _report(out: Outcome, total: int, label: str) -> None:
    say(f"{label}: {total} points: {len(out.reused)} reused, {len(out.copied)} copied from an equal spec, "
        f"{len(out.computed)} computed, {len(out.elsewhere)} computed by a concurrent run, "
        f"{len(out.stale_kept)} stale kept" + (f", {len(out.failed)} failed" if out.failed else ""))
    for slot in out.stale_replaced:
        say(f"  stale, recomputed: {slot}")
    for slot in out.stale_kept:
        say(f"  stale, kept (ALLOW_STALE_RESULTS=1; marked in tables): {slot}")


def run_stages(settings: Settings, names, *, profile: Profile | None = None, random_weights: bool = False,
               **options) -> Outcome:
    """Plan and execute the named stages; `options` go to their plans (plans.plan)."""
    Store(settings.results_dir).check_writable()   # before anything is tokenized, indexed or computed
    ctx = context(settings, tokenize=True, profile=profile, random_weights=random_weights)
    return execute(ctx, plan(ctx, names, **options), label="+".join(names))

