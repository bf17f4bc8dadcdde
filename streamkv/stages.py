"""Stages: compute what a plan is missing, through the store, and say what happened to each point.

A plan is a list of Points (slot, spec; streamkv/plans.py): one loop (`execute`) reuses, copies and writes
every kind of point through the store. Execution, per point: reuse a result with the planned config_hash;
copy one that another slot holds with the same hash (the R=64 sweep point is the main lazy point); otherwise
compute it. A stale result (same slot, other hash) is recomputed, or kept under ALLOW_STALE_RESULTS=1;
either way it is listed. Results are written one by one, atomically, so after a kill -9 a re-run computes
only the points not yet written.

A reused baseline's fingerprint is compared with this machine's: a warning, or a re-run under
STRICT_BASELINE_CHECK=1.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from . import fingerprint, mit
from .console import say
from .context import Context, Point, classify, context
from .mit_runner import MitFailure, MitRunner
from .plans import plan
from .profiles import Profile
from .settings import Settings
from .spec import RunSpec
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


def _written_meanwhile(store: Store, slot: str, config_hash: str, planned: tuple | None) -> bool:
    """Whether another process wrote the slot's result for this hash since this run planned it. File
    identity, not clocks: nodes sharing a results directory need not agree on the time."""
    if store.identity(slot, config_hash) == planned:
        return False
    try:
        return store.read(store.path(slot))["config_hash"] == config_hash
    except ValueError:
        return False


def execute(ctx: Context, points: list[Point], *, runner=None, label: str = "points") -> Outcome:
    """Compute the points that need it; returns what happened to each slot.

    Concurrent runs on one results directory split the work: a point is computed only under its config
    hash's claim (Store.claim). A run first takes the points nobody holds, then waits for the others and
    finds them written (or copies them, or computes what a killed holder left undone)."""
    s, store, out = ctx.settings, ctx.store, Outcome()
    for leftover in store.sweep():
        say(f"removed what a killed write left: {leftover}")
    scan = store.scan()
    for problem in scan.problems:
        say(f"skipped: {problem}")
    # Every readable result by hash, so an equal spec in another slot is copied instead of recomputed (every
    # kind hashes its own spec type, so equal hashes are the same experiment whatever the kind).
    by_hash = {} if s.force else {e.config_hash: e.path for e in scan.entries}
    here = None
    todo, planned = [], {}
    for p in points:
        # The slot's file as this run found it, taken before it is classified: whatever another run writes
        # from here on counts as computed elsewhere (_written_meanwhile), never as a copy of itself. A slot
        # whose directory or file is a link or a special file stops the stage here, before anything is
        # computed (Store.identity).
        planned[p.slot] = store.identity(p.slot, p.spec.config_hash())
        state = "missing" if s.force else classify(ctx, p)
        if state == "current" and p.slot.startswith("baselines/"):
            here = here or fingerprint.collect()
            moved = _baseline_moved(ctx, p, here)
            if moved:
                action = "re-running it (STRICT_BASELINE_CHECK=1)" if s.strict_baseline_check else \
                    "reusing it; STRICT_BASELINE_CHECK=1 re-runs it"
                say(f"warning: {p.slot} was measured in another environment ({'; '.join(moved)}); {action}")
                if s.strict_baseline_check:
                    todo.append((p, False))   # a re-measurement: never a copy of the old numbers
                    continue
        if state == "current":
            out.reused.append(p.slot)
        elif state == "stale" and s.allow_stale_results:
            out.stale_kept.append(p.slot)
        else:
            if state == "stale":
                out.stale_replaced.append(p.slot)
            todo.append((p, True))
    runners = _Runners(ctx, runner)
    scale_out = None if runner is not None else _scale_out_options(s, todo)
    with tqdm(total=len(points), initial=len(points) - len(todo), desc=label, unit="point", file=sys.stderr,
              dynamic_ncols=True) as bar:
        if scale_out is not None:
            todo = _scale_out(ctx, todo, by_hash, scale_out, bar, out)
        for wait in (False, True):   # first what nobody holds, then wait for the rest
            held_elsewhere = []
            for p, may_copy in todo:
                h = p.spec.config_hash()
                with store.claim(h, wait=wait) as mine:
                    if not mine:
                        held_elsewhere.append((p, may_copy))
                        continue
                    bar.set_postfix_str(p.slot)
                    if _written_meanwhile(store, p.slot, h, planned[p.slot]):
                        out.elsewhere.append(p.slot)
                    else:
                        if may_copy and not s.force:   # another run may have computed it for another slot
                            by_hash.update({e.config_hash: e.path for e in store.scan().entries})
                        if may_copy and h in by_hash:
                            store.copy(by_hash[h], p.slot)
                            out.copied.append(p.slot)
                        else:
                            try:
                                by_hash[h] = runners.of(p.spec).run(p.slot, p.spec)
                            except MitFailure as failure:   # a reference that cannot run: the paper goes on
                                say(str(failure))
                                out.failed.append(p.slot)
                            else:
                                out.computed.append(p.slot)
                    bar.update()
            todo = held_elsewhere
    _report(out, len(points), label)
    return out


class _Runners:
    """The runner of each kind of spec, made on first need: torch and the engines load only when a RunSpec
    must be computed. `runner` (tests) replaces the one for RunSpecs."""

    def __init__(self, ctx: Context, runner=None):
        self.ctx, self.run_runner, self.mit_runner = ctx, runner, None

    def of(self, spec):
        if isinstance(spec, mit.MitSpec):
            self.mit_runner = self.mit_runner or MitRunner(self.ctx.store, self.ctx.settings)
            return self.mit_runner
        if self.run_runner is None:
            from .runner import Runner  # torch and the engines load only when a RunSpec must be computed
            self.run_runner = Runner(self.ctx.store, cpu_threads=self.ctx.settings.cpu_threads)
        return self.run_runner


def _scale_out_options(settings: Settings, todo: list[tuple[Point, bool]]):
    """executors.Options when the RunSpec points go to workers (--workers, --gpus, --executor slurm), else
    None: one worker without GPUs computes in this process, as the loop in `execute` does."""
    if not any(isinstance(p.spec, RunSpec) for p, _ in todo):
        return None
    from . import executors  # submitit, and torch with the engines, only when something must be computed

    opts = executors.options(settings)
    return None if opts.in_process else opts


def _scale_out(ctx: Context, todo: list[tuple[Point, bool]], by_hash: dict, opts, bar: tqdm,
               out: Outcome) -> list[tuple[Point, bool]]:
    """The RunSpec points computed by workers (streamkv/executors.py), each equal spec once: copies of
    existing results first, then the workers (the baseline split over them), then copies of what they made.
    Returns the other points (the MIT reference's), which run in this process."""
    from . import executors, worker

    store, compute, planned, deferred = ctx.store, [], {}, []
    rest = [(p, may_copy) for p, may_copy in todo if not isinstance(p.spec, RunSpec)]
    for p, may_copy in todo:
        if not isinstance(p.spec, RunSpec):
            continue
        h = p.spec.config_hash()
        if may_copy and h in by_hash:
            store.copy(by_hash[h], p.slot)
            out.copied.append(p.slot)
            bar.update()
        elif may_copy and h in planned:
            deferred.append(p)        # an equal spec computed in this run: copied once it lands
        else:
            planned.setdefault(h, p.slot)
            compute.append(p)
            path = store.path(p.slot)
            # A current result to measure again (FORCE, STRICT_BASELINE_CHECK) is removed first, as a rewrite
            # would, so that the workers' "already done" check does not keep it.
            if store.lookup(p.slot, h, allow_stale=False) is not None:
                with store.lock(path):
                    store.tree.unlink(path)
    units = worker.units_of([(p.slot, p.spec) for p in compute], executors.worker_count(opts, len(compute)))
    executors.run(store, units, opts, bar)
    out.computed += [p.slot for p in compute]
    for p in deferred:
        store.copy(store.path(planned[p.spec.config_hash()]), p.slot)
        out.copied.append(p.slot)
        bar.update()
    return rest


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

